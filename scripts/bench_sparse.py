"""Sparse attention backends vs dense cuDNN SDPA at the Wan2.1-1.3B 480p self-attention shape.

One attention call, B=1, H=12, S=21x30x52=32760 tokens, D=128, bf16. For each sparse backend and
sparsity: the median time of a whole call (``ms``: block selection included, through
``AttentionLayer`` as a model calls it), of the selection alone (``select``: launched back to back
with no attention in between, so launch-bound; inside a call it overlaps the previous kernel) and
of the block-sparse kernel alone (``kernel``), the fraction of blocks kept, and the relative L2
error against a float32 dense result. Inputs are locality-structured (see
:func:`structured_qkv`), as video DiT attention is; random inputs have no structure to exploit.

    python scripts/bench_sparse.py --out results/sparse.json          # CUDA, full shape
    python scripts/bench_sparse.py --small --out /tmp/sparse.json     # CPU smoke test

Targets: block_sparse >= 3x faster than cuDNN at 75% sparsity and >= 6x at 90%, with
rel-L2 <= 0.05 at 75%.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import device_name, write_json  # noqa: E402
from bench_common import median_ms as _median_ms  # noqa: E402

from attnbridge.attention.api import AttentionLayer  # noqa: E402
from attnbridge.attention.contract import AttentionContext  # noqa: E402
from attnbridge.attention.options import kept_count  # noqa: E402
from attnbridge.attention.sparse.layout import resolve_layout  # noqa: E402
from attnbridge.attention.sparse.selection import BlockSelection, select_by_mass  # noqa: E402

FULL = {"grid": (21, 30, 52), "heads": 12, "dim": 128, "dtype": torch.bfloat16}
SMALL = {"grid": (3, 8, 24), "heads": 2, "dim": 64, "dtype": torch.float32}


def structured_qkv(grid, heads, dim, *, device, dtype, noise=0.5, seed=0):
    """q, k, v ``[1, T*H*W, heads, dim]`` smooth over the (T, H, W) grid, plus white noise.

    A random field on a coarse grid (about 3 frames x 5 rows x 8 columns per cell) is trilinearly
    upsampled to the token grid and normalized to unit variance. q and k share one field, so a
    token's query matches the keys of its neighbours best (locality, as in video DiTs); v has its
    own field. Each gets independent noise of std ``noise``.
    """
    frames, height, width = grid
    coarse = (max(2, math.ceil(frames / 3)), max(2, math.ceil(height / 5)), max(2, math.ceil(width / 8)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    channels = heads * dim

    def field():
        low = torch.randn(1, channels, *coarse, generator=gen).to(device)
        up = F.interpolate(low, size=grid, mode="trilinear", align_corners=True)[0]
        up = (up - up.mean(dim=(1, 2, 3), keepdim=True)) / up.std(dim=(1, 2, 3), keepdim=True)
        return up.reshape(heads, dim, -1).permute(2, 0, 1)  # [S, heads, dim]

    def noisy(x):
        return (x + noise * torch.randn(x.shape, generator=gen).to(device)).to(dtype).contiguous()[None]

    shared, values = field(), field()
    return noisy(shared), noisy(shared), noisy(values)


def median_ms(fn, reps: int = 5) -> float:
    """This script's timing: do_bench 50/300 ms on CUDA, else one warm-up and ``reps`` wall runs."""
    return _median_ms(fn, warmup=1, repeat=reps, bench_warmup_ms=50, bench_rep_ms=300)


def dense_cudnn(q, k, v):
    """The baseline: torch SDPA with the cuDNN kernel (CPU: whatever SDPA picks)."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def dense_float32(q, k, v):
    """Reference output in float32 (mem-efficient SDPA on GPU, math on CPU)."""
    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def rel_l2(actual, expected) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def oracle_selection(q, k, scale, sparsity, layout) -> BlockSelection:
    """``block_sparse``'s budget and placement, fed the *exact* attention mass of each block pair
    (softmax summed over the query block) instead of the estimate: a reference for how much the
    estimate costs. Not a strict bound (a search that minimises the output error directly can do a
    little better). Bench-only (it computes full attention)."""
    block, nb = layout.block_size, layout.num_blocks
    mass = torch.zeros(q.shape[0], q.shape[2], nb, nb, device=q.device)
    kt = k.float().transpose(1, 2)  # [B, H, S, D]
    pad = nb * block - k.shape[1]
    for row in range(nb):
        qr = q[:, row * block : (row + 1) * block].float().transpose(1, 2)
        probs = torch.softmax(qr @ kt.transpose(-1, -2) * scale, dim=-1).mean(dim=2)  # [B, H, S]
        mass[:, :, row] = F.pad(probs, (0, pad)).unflatten(-1, (nb, block)).sum(-1)
    text = torch.arange(nb, device=q.device) >= layout.text_start_block
    budget = torch.full(mass.shape[:2], kept_count(sparsity, nb * nb), device=q.device)
    return select_by_mass(mass.clamp(min=1e-30).log(), budget, text[:, None] | text[None, :])


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def selection_profile(select, reps: int = 5, top: int = 8) -> list[dict]:
    """The selection's slowest device kernels, microseconds per call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            select()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    return [{"kernel": e.key[:80], "us_per_call": round(e.device_time_total / reps, 1)} for e in events]


def bench_backend(backend, sparsity, q, k, v, grid, reference, device, profile_selection=False):
    """One backend at one sparsity through ``AttentionLayer`` (what a model calls), then its stages."""
    context = AttentionContext(kind="self", grid=grid, step=10)
    layer = AttentionLayer(backend, sparsity=sparsity)
    out = layer(q, k, v, context=context)  # compiles the selection on first use
    err = rel_l2(out, reference)
    graphs_before = unique_graphs()
    call_ms = median_ms(lambda: layer(q, k, v, context=context))
    recompiles = unique_graphs() - graphs_before
    impl = layer.impl_for(q.device)
    row = {
        "backend": backend,
        "sparsity": sparsity,
        "ms": call_ms,
        "select_ms": None,
        "kernel_ms": None,
        "kept_fraction": impl.kept_fraction(q, k, context),
        "rel_l2": err,
        "oracle_rel_l2": None,
        "recompiles_while_timing": recompiles,
    }
    if backend == "vsa":
        return row
    scale = 1.0 / math.sqrt(q.shape[-1])
    layout = resolve_layout(backend, q, context, impl.selector.image_order)
    qs, ks, vs = (layout.to_mask_order(x) for x in (q, k, v))
    options = layer.options

    def select():
        return impl.selector.select(qs, ks, scale, options, layout)

    selection = select()
    counts = selection.counts.float()
    row["kept_per_row"] = {
        "min": int(counts.min()),
        "mean": round(float(counts.mean()), 1),
        "max": int(counts.max()),
    }
    row["select_ms"] = median_ms(select)
    if profile_selection and device.type == "cuda":
        row["select_kernels"] = selection_profile(select)
    row["kernel_ms"] = median_ms(lambda: impl.kernel.run(qs, ks, vs, selection, scale, False, layout))
    if backend == "block_sparse":
        oracle = oracle_selection(qs, ks, scale, sparsity, layout)
        oracle_out = layout.from_mask_order(impl.kernel.run(qs, ks, vs, oracle, scale, False, layout))
        row["oracle_rel_l2"] = rel_l2(oracle_out, reference)
    return row


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--small", action="store_true", help="small shape on CPU (smoke test)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--backends", nargs="+", default=["block_sparse", "rain_fusion"])
    parser.add_argument("--vsa-sparsity", type=float, nargs="*", default=[0.875])
    parser.add_argument(
        "--profile-selection", action="store_true", help="record the selection's slowest GPU kernels"
    )
    args = parser.parse_args(argv)

    shape = SMALL if args.small else FULL
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    grid, heads, dim, dtype = shape["grid"], shape["heads"], shape["dim"], shape["dtype"]
    q, k, v = structured_qkv(grid, heads, dim, device=device, dtype=dtype)
    reference = dense_float32(q, k, v)
    dense_ms = median_ms(lambda: dense_cudnn(q, k, v))
    dense_err = rel_l2(dense_cudnn(q, k, v), reference)
    print(f"dense cuDNN SDPA {dense_ms:.3f} ms", flush=True)

    rows = []
    runs = [(b, s) for b in args.backends for s in args.sparsity] + [("vsa", s) for s in args.vsa_sparsity]
    for backend, sparsity in runs:
        row = bench_backend(backend, sparsity, q, k, v, grid, reference, device, args.profile_selection)
        row["speedup_vs_dense"] = dense_ms / row["ms"]
        rows.append(row)
        print(
            {key: (round(val, 4) if isinstance(val, float) else val) for key, val in row.items()}, flush=True
        )

    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()})"
    )
    print(f"shape B=1 S={q.shape[1]} H={heads} D={dim} {str(dtype).removeprefix('torch.')}, grid {grid}")
    print(f"dense cuDNN SDPA: {dense_ms:.3f} ms (rel-L2 vs float32 {dense_err:.4f})")
    header = f"{'backend':<13}{'sparsity':>9}{'ms':>9}{'select':>9}{'kernel':>9}{'speedup':>9}"
    print(header + f"{'kept':>7}{'rel-L2':>9}{'oracle':>9}{'recomp':>7}")
    for r in rows:
        oracle = "-" if r["oracle_rel_l2"] is None else f"{r['oracle_rel_l2']:.4f}"
        print(
            f"{r['backend']:<13}{r['sparsity']:>9.2f}{r['ms']:>9.3f}{_fmt(r['select_ms']):>9}"
            f"{_fmt(r['kernel_ms']):>9}{r['speedup_vs_dense']:>8.2f}x{r['kept_fraction']:>7.3f}"
            f"{r['rel_l2']:>9.4f}{oracle:>9}{r['recompiles_while_timing']:>7d}"
        )
    result = {
        # The device the tensors ran on (a --small run on a host with a GPU runs on its CPU).
        "device": device_name(device.type),
        "shape": {
            "batch": 1,
            "seq": q.shape[1],
            "heads": heads,
            "head_dim": dim,
            "dtype": str(dtype),
            "grid": grid,
        },
        "kernel": "triton" if device.type == "cuda" else "flex (float32 reference)",
        "dense_cudnn_ms": dense_ms,
        "dense_cudnn_rel_l2": dense_err,
        "results": rows,
    }
    write_json(args.out, result, kind="sparse")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
