"""One Wan2.1-1.3B-size transformer step at 480p (random weights): unpatched diffusers vs attnbridge
backends, eager and (``--compile``) under diffusers' regional compile.

Builds the real ``WanTransformer3DModel`` with the 1.3B architecture (30 layers, 12 heads of 128,
ffn 8960) and a 480p latent (16 x 21 x 60 x 104 -> 32,760 tokens). For each backend it checks the
patched output against the unpatched eager one on the same random input, then times the step
(median).

With ``--compile`` the unpatched default and every backend are also timed after
``transformer.compile_repeated_blocks(fullgraph=True)`` (one compiled graph shared by the repeated
blocks), and every row is reported against both the default eager and the default compiled step of
the same run: compile speeds up the default too, so a backend's gain is only what it adds on top.
A compile that fails (a graph break under ``fullgraph=True``, an op dynamo cannot trace) is a row
marked failed with the error's first line; the other rows still run.

    python scripts/bench_wan_step.py --backends sdpa fa block_sparse:0.85 --compile --out step.json
    python scripts/bench_wan_step.py --small --compile        # CPU smoke run on a tiny config

Exits with status 1 when an eager row fails (a failed compile alone does not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    DEFAULT,
    WAN_1_3B,
    add_timing_arguments,
    device_name,
    model_device,
    parse_backend,
    print_table,
    rel_l2,
    wall_ms,
    write_json,
)

from attnbridge import disable_npu_attention, enable_npu_attention  # noqa: E402

WAN_SMALL = {
    **WAN_1_3B,
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "ffn_dim": 256,
    "num_layers": 2,
    "text_dim": 64,
}


def compile_blocks(model) -> None:
    """diffusers' regional compile: ``torch.compile`` on each repeated block, the way a user of
    diffusers compiles a Wan transformer (a module-level function so a test can make it fail)."""
    model.compile_repeated_blocks(fullgraph=True)


def uncompile(model) -> None:
    """Back to eager, so the next backend is compiled against its own processors: drop what
    ``nn.Module.compile`` installed on each block and dynamo's caches of the previous graphs."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()


def error_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, with dynamo's ``Explanation:`` line when it has one
    (that line names what broke the graph): dynamo errors run to pages, the table needs one line."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()
    explanation = next((line for line in lines if line.startswith("Explanation:")), None)
    if explanation:
        text += f" ({explanation.removeprefix('Explanation:').strip()})"
    return text[:300]


def measure(model, step, reference, backend: str, mode: str, *, warmup: int, repeat: int) -> dict:
    """One row: ``backend`` (``DEFAULT`` or ``name[:sparsity]``) in ``mode`` (``eager`` or
    ``compiled``) checked against ``reference`` and timed; a failure is recorded in the row
    (``ms`` None, ``error``), and the model is left unpatched and eager either way."""
    row = {"backend": backend, "mode": mode}
    patched = False
    try:
        if backend != DEFAULT:
            name, options = parse_backend(backend)
            enable_npu_attention(model, backend=name, **options)
            patched = True
        if mode == "compiled":
            compile_blocks(model)
        out = step().float()  # compiles, under --compile
        row["ms"] = round(wall_ms(step, warmup=warmup, repeat=repeat), 2)
        row["rel_l2"] = "-" if reference is None else f"{rel_l2(out, reference):.2e}"
    except Exception as exc:  # reported in the table; the other rows still run
        row.update(ms=None, rel_l2="-", error=error_line(exc))
        print(f"{backend} ({mode}) failed:\n{exc}", file=sys.stderr)
    finally:
        if mode == "compiled":
            uncompile(model)
        if patched:
            disable_npu_attention(model)
    print(row, flush=True)  # as it comes: a run cut short still shows its finished rows
    return row


def add_ratios(rows: list[dict], modes: list[str]) -> None:
    """Speedup of every row over the default eager step and, with compile, the default compiled
    step of the same run (``-`` where either side failed)."""
    default = {r["mode"]: r["ms"] for r in rows if r["backend"] == DEFAULT}
    for row in rows:
        for mode in modes:
            base = default.get(mode)
            ok = base is not None and row["ms"] is not None
            row[f"speedup vs default {mode}"] = f"{base / row['ms']:.3f}x" if ok else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["sdpa", "fa"])
    parser.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames -> 21)")
    parser.add_argument("--height", type=int, default=60, help="latent height (480 / 8)")
    parser.add_argument("--width", type=int, default=104, help="latent width (832 / 8)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time every row after compile_repeated_blocks(fullgraph=True)",
    )
    add_timing_arguments(parser)
    args = parser.parse_args(argv)

    import diffusers
    from diffusers import WanTransformer3DModel

    device, dtype = model_device(args.small)
    config = WAN_SMALL if args.small else WAN_1_3B
    frames, height, width = (3, 8, 8) if args.small else (args.frames, args.height, args.width)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(device=device, dtype=dtype).eval()
    latent = torch.randn(1, 16, frames, height, width, device=device, dtype=dtype)
    text = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)
    tokens = frames * (height // 2) * (width // 2)

    @torch.inference_mode()
    def step():
        return model(hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False)[
            0
        ]

    modes = ["eager", "compiled"] if args.compile else ["eager"]
    timing = dict(warmup=args.warmup, repeat=args.repeat)
    reference = step().float()
    rows = [measure(model, step, None, DEFAULT, "eager", **timing)]
    if rows[0]["ms"] is None:
        raise SystemExit(f"the unpatched eager step failed: {rows[0]['error']}")
    rows += [measure(model, step, reference, DEFAULT, mode, **timing) for mode in modes[1:]]
    for backend in args.backends:
        rows += [measure(model, step, reference, backend, mode, **timing) for mode in modes]
    add_ratios(rows, modes)

    print(f"device: {device_name(device)}  tokens {tokens}  dtype {dtype}  layers {config['num_layers']}")
    columns = ["backend", "mode", "ms", *(f"speedup vs default {m}" for m in modes), "rel_l2", "error"]
    print_table(
        [{k: ("failed" if k == "ms" and v is None else v) for k, v in r.items()} for r in rows], columns
    )
    write_json(
        args.out,
        {
            "device": device_name(device),
            "diffusers": diffusers.__version__,
            "tokens": tokens,
            "dtype": str(dtype),
            "compile": args.compile,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "config": {k: str(v) for k, v in config.items()},
            "rows": rows,
        },
        kind="wan_step",
    )
    failed = [r for r in rows if r["ms"] is None]
    for row in failed:
        print(f"FAILED {row['backend']} ({row['mode']}): {row['error']}")
    return 1 if any(r["mode"] == "eager" for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
