"""The Triton block-sparse kernel at the Wan2.1-1.3B 480p self-attention shape, against cuDNN dense
SDPA and compiled FlexAttention on the same block lists, with a sweep of its launch choices.

B=1, S=21x30x52=32760, H=12, D=128, bf16, random inputs. Cases: 128-token blocks with every block
kept (dense), 25% kept, 10.3% kept plus the first 2 and last 2 query blocks dense (first-frame rows),
and 64-token blocks with 12.5% kept (VSA's fine stage; the 32760 tokens end in a partial block).
For each case: every timed configuration is checked against a float64 dense masked reference
(rel-L2), timed with ``triton.testing.do_bench`` (median), and the best one reported with its
speedup over cuDNN and its share of the ideal (cuDNN time x kept fraction / kernel time).

    python scripts/bench_block_sparse_kernel.py --out results/kernel.json            # H200, ~6 min
    python scripts/bench_block_sparse_kernel.py --quick --out /tmp/kernel.json       # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import write_json  # noqa: E402

from attnbridge.attention.sparse import triton_kernel as tk  # noqa: E402

FULL = {"grid": (21, 30, 52), "heads": 12, "dim": 128}
QUICK = {"grid": (4, 16, 32), "heads": 2, "dim": 128}
QUICK_CPU = {"grid": (1, 10, 20), "heads": 2, "dim": 64}
#: (name, block_size, kept fraction of each row, dense first/last query blocks)
CASES = [
    ("dense_bs128", 128, 1.0, 0),
    ("keep25_bs128", 128, 0.25, 0),
    ("keep10.3_bs128_dense_ends", 128, 0.103, 2),
    ("keep12.5_bs64", 64, 0.125, 0),
]
FLEX_OPTIONS = {
    128: {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    64: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}
#: rel-L2 against float64 above which a configuration counts as wrong (bf16 rounding is ~5e-3).
MAX_REL_L2 = 2e-2


def log(message: str) -> None:
    print(message, flush=True)


def timer(quick: bool):
    """Median ms of a call: ``do_bench`` on CUDA, wall time around a few calls on the interpreter."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        warmup, rep = (10, 30) if quick else (25, 100)
        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def wall(fn):
        fn()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall


def block_lists(heads, n_q, n_k, fraction, dense_ends, *, device, seed):
    """Per head and query block, ``round(fraction * n_k)`` random distinct key blocks (ascending);
    the first and last ``dense_ends`` query blocks list every key block."""
    gen = torch.Generator().manual_seed(seed)
    count = max(1, min(n_k, round(fraction * n_k)))
    chosen = torch.rand(1, heads, n_q, n_k, generator=gen).argsort(dim=-1)[..., :count]
    chosen = chosen.sort(dim=-1).values
    indices = torch.zeros(1, heads, n_q, n_k, dtype=torch.int64)
    indices[..., :count] = chosen
    counts = torch.full((1, heads, n_q), count, dtype=torch.int32)
    every = torch.arange(n_k)
    for row in list(range(dense_ends)) + list(range(n_q - dense_ends, n_q)):
        indices[:, :, row] = every
        counts[:, :, row] = n_k
    return indices.to(torch.int32).to(device), counts.to(device)


@torch.no_grad()
def reference(q, k, v, indices, counts, block_size, scale, rows_per_chunk=2048):
    """float64 dense attention masked to the listed blocks, head by head in query chunks."""
    _, seq, heads, _ = q.shape
    n_q, n_k = indices.shape[2], -(-seq // block_size)
    listed = torch.arange(indices.shape[-1], device=q.device) < counts[..., None]
    table = torch.zeros(heads, n_q, n_k + 1, dtype=torch.bool, device=q.device)
    table.scatter_(-1, torch.where(listed, indices.long(), n_k)[0], True)
    table = table[..., :n_k]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    rows_per_chunk = max(block_size, rows_per_chunk // block_size * block_size)
    for head in range(heads):
        kd, vd = k[0, :, head].double(), v[0, :, head].double()
        for first in range(0, seq, rows_per_chunk):
            last = min(seq, first + rows_per_chunk)
            rows = table[head, first // block_size : -(-last // block_size)]
            mask = rows.repeat_interleave(block_size, 0)[: last - first].repeat_interleave(block_size, 1)
            scores = (q[0, first:last, head].double() @ kd.T) * scale
            scores = scores.masked_fill(~mask[:, :seq], float("-inf"))
            out[0, first:last, head] = torch.softmax(scores, dim=-1).nan_to_num_(0.0) @ vd
    return out


def rel_l2(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def sweep_configs(block_size: int, quick: bool) -> list[tk.KernelConfig]:
    """Tile and pipeline choices, first the default; schedules are swept around the best later."""
    C = tk.KernelConfig
    if quick:
        configs = [C(block_n=block_size, num_warps=8, num_stages=2), C(block_n=64, num_warps=4, num_stages=3)]
        return configs + [dataclasses.replace(c, use_tma=False) for c in configs]
    configs = []
    for use_tma in (True, False):
        if block_size == 128:
            configs += [C(block_n=128, num_warps=8, num_stages=stages, use_tma=use_tma) for stages in (2, 3)]
        for warps in (4, 8):
            for stages in (2, 3, 4):
                configs.append(C(block_n=64, num_warps=warps, num_stages=stages, use_tma=use_tma))
    if block_size == 128:
        for block_n in (128, 64):
            for stages in (2, 3):
                configs.append(C(block_m=64, block_n=block_n, num_warps=4, num_stages=stages, use_tma=True))
    else:
        configs += [C(block_n=64, num_warps=4, num_stages=5, use_tma=True)]
    return configs


def schedule_variants(best: tk.KernelConfig) -> list[tk.KernelConfig]:
    """Around the best tiles: issue order, sequence-end mask."""
    variants = [
        dataclasses.replace(best, ordered=not best.ordered),
        dataclasses.replace(best, mask_branch=not best.mask_branch),
    ]
    return [v for v in variants if v != best]


def config_dict(config: tk.KernelConfig) -> dict:
    return dataclasses.asdict(config)


def run_case(name, block_size, fraction, dense_ends, shape, args, time_ms, deadline) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    frames, height, width = shape["grid"]
    seq, heads, dim = frames * height * width, shape["heads"], shape["dim"]
    n_q = n_k = -(-seq // block_size)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, seq, heads, dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3)
    )
    indices, counts = block_lists(heads, n_q, n_k, fraction, dense_ends, device=device, seed=1)
    scale = 1.0 / math.sqrt(dim)
    kept = float(counts.double().sum() / (heads * n_q * n_k))
    result = {
        "block_size": block_size,
        "seq": seq,
        "heads": heads,
        "dim": dim,
        "kept_fraction": kept,
        "row_counts": sorted({int(c) for c in counts.unique().tolist()}),
    }
    log(f"\n== {name}: S={seq} H={heads} D={dim} block {block_size}, kept {kept:.4f}")
    start = time.perf_counter()
    ref = reference(q, k, v, indices, counts, block_size, scale)
    log(f"reference (float64) in {time.perf_counter() - start:.1f} s")

    def attempt(label, fn, check=True):
        try:
            out = fn()
            err = rel_l2(out, ref) if check else None
            if err is not None and not err <= MAX_REL_L2:
                log(f"{label}: WRONG rel-L2 {err:.3e}")
                return {"error": f"rel-L2 {err:.3e} > {MAX_REL_L2}", "rel_l2": err}
            ms = time_ms(fn)
            log(f"{label}: {ms:.3f} ms" + (f"  rel-L2 {err:.2e}" if err is not None else ""))
            return {"ms": ms, "rel_l2": err}
        except Exception as exc:  # one failing configuration must not stop the run
            log(f"{label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            return {"error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-2000:]}

    # baselines
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, k, v))

        def sdpa(backend):
            def call():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qb, kb, vb, scale=scale)

            return call

        dense = {}
        for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            entry = attempt(f"{label} dense", sdpa(backend), check=False)
            dense[label] = entry
        result["cudnn"], result["flash"] = dense["cudnn"], dense["flash"]
        if not args.no_flex:
            result["flex"] = attempt(
                "flex", lambda: flex_call(q, k, v, indices, counts, block_size, scale, seq)
            )
    result["default_config"] = config_dict(tk.default_config(block_size, dim, dtype, q.device))

    def ours(config):
        def call():
            return tk.launch(q, k, v, indices, counts, block_size=block_size, scale=scale, config=config)[0]

        return call

    result["public"] = attempt(
        "block_sparse_attention (defaults)",
        lambda: tk.block_sparse_attention(q, k, v, indices, counts, block_size=block_size, scale=scale),
    )
    if device == "cuda":

        def layer(q, k, v, indices, counts):
            return tk.block_sparse_attention(q, k, v, indices, counts, block_size=block_size, scale=scale)

        compiled = torch.compile(layer, fullgraph=True)
        result["public_compiled"] = attempt(
            "block_sparse_attention (defaults) in torch.compile(fullgraph=True)",
            lambda: compiled(q, k, v, indices, counts),
        )
    sweep = []
    configs = sweep_configs(block_size, args.quick)
    for config in configs:
        if time.perf_counter() > deadline:
            log("time budget reached: sweep cut short")
            result["sweep_cut_short"] = True
            break
        entry = attempt(f"kernel {describe(config)}", ours(config))
        sweep.append({"config": config_dict(config), **entry})
    timed = [(s["ms"], s) for s in sweep if "ms" in s]
    if timed and time.perf_counter() < deadline:
        best = tk.KernelConfig(**min(timed, key=lambda t: t[0])[1]["config"])
        for config in schedule_variants(best):
            if time.perf_counter() > deadline:
                result["sweep_cut_short"] = True
                break
            entry = attempt(f"kernel {describe(config)}", ours(config))
            sweep.append({"config": config_dict(config), **entry})
    result["sweep"] = sweep
    timed = [s for s in sweep if "ms" in s]
    if timed:
        best = min(timed, key=lambda s: s["ms"])
        result["best"] = best
        cudnn_ms = result.get("cudnn", {}).get("ms")
        if cudnn_ms:
            result["speedup_vs_cudnn"] = cudnn_ms / best["ms"]
            result["share_of_ideal"] = cudnn_ms * kept / best["ms"]
            flex_ms = result.get("flex", {}).get("ms")
            if flex_ms:
                result["speedup_vs_flex"] = flex_ms / best["ms"]
        log(f"best: {describe(tk.KernelConfig(**best['config']))} {best['ms']:.3f} ms")
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


_flex_compiled = None


def flex_call(q, k, v, indices, counts, block_size, scale, seq):
    """Compiled FlexAttention on the same lists, every listed block a *full* block."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    n_k = -(-seq // block_size)
    full = (
        torch.nn.functional.pad(indices, (0, n_k - indices.shape[-1])) if indices.shape[-1] < n_k else indices
    )
    block_mask = BlockMask.from_kv_blocks(
        torch.zeros_like(counts),
        full,
        counts,
        full,
        BLOCK_SIZE=block_size,
        seq_lengths=(seq, seq),
        compute_q_blocks=False,
    )
    out = _flex_compiled(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=block_mask,
        scale=scale,
        kernel_options=FLEX_OPTIONS[block_size],
    )
    return out.transpose(1, 2)


def describe(config: tk.KernelConfig) -> str:
    parts = [f"m{config.block_m or '-'} n{config.block_n or '-'} w{config.num_warps} s{config.num_stages}"]
    parts.append("tma" if config.use_tma is not False else "ptr")
    if not config.ordered:
        parts.append("unordered")
    if not config.mask_branch:
        parts.append("mask-every-tile")
    return " ".join(parts)


def table(results: dict) -> str:
    lines = [
        f"{'case':<28} {'kept':>6} {'cudnn':>7} {'flex':>7} {'default':>8} {'best':>7} "
        f"{'x cudnn':>7} {'ideal':>6} {'rel-L2':>8}  best config"
    ]

    def ms(entry):
        return f"{entry['ms']:.3f}" if isinstance(entry, dict) and "ms" in entry else "-"

    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<28} FAILED {r['error'][:80]}")
            continue
        best = r.get("best")
        lines.append(
            f"{name:<28} {r['kept_fraction']:>6.3f} {ms(r.get('cudnn')):>7} {ms(r.get('flex')):>7} "
            f"{ms(r.get('public')):>8} {ms(best):>7} {r.get('speedup_vs_cudnn', float('nan')):>7.2f} "
            f"{r.get('share_of_ideal', float('nan')):>6.2f} "
            f"{(best or {}).get('rel_l2') or float('nan'):>8.1e}  "
            + (describe(tk.KernelConfig(**best["config"])) if best else "-")
        )
    return "\n".join(lines)


NOTE = (
    "random inputs; kernel only (lists given); kept = listed block pairs / all; the 0.116 case lists "
    "~10.3% of blocks plus 2 dense query blocks at each end; share of ideal = cuDNN ms x kept / Triton ms"
)


def _config_text(config: dict) -> str:
    text = f"m{config['block_m'] or '-'} n{config['block_n']} w{config['num_warps']} s{config['num_stages']}"
    text += " tma" if config["use_tma"] else ""
    text += "" if config["ordered"] else " unordered"
    return text + (" persistent" if config.get("persistent") else "")  # the recorded runs swept one too


def summary_rows(results: dict) -> list[dict]:
    """One row per case for docs/benchmarks.md: Triton (defaults) beside FlexAttention and cuDNN."""
    rows = []
    for name, case in results.items():
        if "error" in case:
            rows.append({"case": name, "error": case["error"]})
            continue
        ours, cudnn = case["public"]["ms"], case["cudnn"]["ms"]
        best = min((r for r in case["sweep"] if r.get("ms")), key=lambda r: r["ms"])
        rows.append(
            {
                "case": name,
                "block": case["block_size"],
                "kept": round(case["kept_fraction"], 4),
                "cudnn ms": round(cudnn, 3),
                "flex ms": round(case["flex"]["ms"], 3) if case.get("flex") else "-",
                "triton ms": round(ours, 3),
                "triton compiled ms": round(case["public_compiled"]["ms"], 3),
                "vs cudnn": f"{cudnn / ours:.2f}x",
                "vs flex": f"{case['flex']['ms'] / ours:.2f}x" if case.get("flex") else "-",
                "share of ideal": round(cudnn * case["kept_fraction"] / ours, 2),
                "rel_l2": f"{case['public']['rel_l2']:.1e}",
                "best swept": f"{best['ms']:.3f} ({_config_text(best['config'])})",
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="small shape, few configurations")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop sweeping after this many seconds")
    parser.add_argument("--cases", nargs="*", help="run only these cases (names as printed)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile is slow)")
    args = parser.parse_args(argv)
    if not tk.available():
        log("triton with a CUDA device (or TRITON_INTERPRET=1) is needed")
        return 1
    begin = time.perf_counter()
    shape = FULL if not args.quick else (QUICK if torch.cuda.is_available() else QUICK_CPU)
    cases = [c for c in CASES if not args.cases or c[0] in args.cases]
    time_ms = timer(args.quick)
    results = {}
    for number, (name, block_size, fraction, dense_ends) in enumerate(cases):
        # each remaining case gets an equal share of the remaining budget for its sweep
        remaining = args.budget_s - (time.perf_counter() - begin)
        deadline = time.perf_counter() + remaining / (len(cases) - number)
        try:
            results[name] = run_case(name, block_size, fraction, dense_ends, shape, args, time_ms, deadline)
        except Exception as exc:
            log(f"{name}: FAILED {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
    report = {
        "triton": getattr(tk.triton, "__version__", None),
        "shape": {"batch": 1, **{k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()}},
        "dtype": "bfloat16",
        "max_rel_l2": MAX_REL_L2,
        "seconds": time.perf_counter() - begin,
        "note": NOTE,
        "rows": summary_rows(results),
        "cases": results,
    }
    write_json(str(args.out), report, kind="block_sparse_kernel")
    log("\n" + table(results))
    log(f"\nwrote {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
