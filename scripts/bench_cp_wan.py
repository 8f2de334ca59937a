"""Sequence-parallel Wan2.1-1.3B-size transformer step at 720p over N GPUs: ring N, Ulysses N, 2x2.

Builds the real ``WanTransformer3DModel`` with the 1.3B architecture (random weights, same seed on
every rank) and a 720p latent (16 x 21 x 90 x 160 -> 21 x 45 x 80 = 75,600 tokens, bf16). Every
rank first runs the single-GPU step itself (unpatched diffusers, then attnbridge ``fa`` on one
GPU), then each parallel layout through ``enable_npu_attention(model, "fa", ring_degree=...,
ulysses_degree=...)``; each rank checks its gathered output against the single-GPU output
(rel-L2, max over ranks) and the step is timed (median, max over ranks). Scaling efficiency is
``t1 / (N * tN)`` with ``t1`` the single-GPU attnbridge ``fa`` step.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 4 scripts/bench_cp_wan.py --out cp_wan.json
    torchrun --nproc_per_node 2 scripts/bench_cp_wan.py --small       # CPU gloo smoke run

Exits with status 1 when an output differs from the single-GPU one by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import WAN_1_3B, device_name, print_table, rel_l2, wall_ms, write_json  # noqa: E402

from attnbridge import disable_npu_attention, enable_npu_attention  # noqa: E402
from attnbridge.attention.parallel import init_distributed  # noqa: E402

WAN_SMALL = {
    **WAN_1_3B,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
    "text_dim": 64,
}


def layouts(world: int, heads: int) -> list[tuple[str, int, int]]:
    """(name, ring_degree, ulysses_degree) worth timing on ``world`` ranks."""
    if world == 1:
        return []
    found = [(f"ring {world}", world, 1)]
    if heads % world == 0:
        found.append((f"ulysses {world}", 1, world))
    if world == 4:
        found.append(("ring 2 x ulysses 2", 2, 2))
    return found


def max_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def step_ms(fn, *, warmup: int, repeat: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms, the same number of calls on every rank (collectives inside
    must match), each started together after a barrier; the slowest rank's median."""
    barrier = dist.barrier if dist.is_initialized() else None
    return max_over_ranks(wall_ms(fn, warmup=warmup, repeat=repeat, before_each=barrier), device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny config on CPU (gloo smoke run)")
    parser.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames -> 21)")
    parser.add_argument("--height", type=int, default=90, help="latent height (720 / 8)")
    parser.add_argument("--width", type=int, default=160, help="latent width (1280 / 8)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tol", type=float, default=None, help="max rel-L2 (default 3e-2 bf16, 1e-4 fp32)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import diffusers
    from diffusers import WanTransformer3DModel

    info = init_distributed()
    device, rank, world = info.device, info.rank, info.world_size
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    config = WAN_SMALL if args.small else WAN_1_3B
    frames, height, width = (3, 6, 10) if args.small else (args.frames, args.height, args.width)
    tokens = frames * (height // 2) * (width // 2)

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        model = WanTransformer3DModel(**config).to(device=device, dtype=dtype).eval()
    if dist.is_initialized():  # every rank must hold exactly rank 0's weights
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    gen = torch.Generator().manual_seed(1)  # the same inputs on every rank
    latent = torch.randn(1, 16, frames, height, width, generator=gen).to(device, dtype)
    text = torch.randn(1, 512, config["text_dim"], generator=gen).to(device, dtype)
    timestep = torch.tensor([500], device=device)

    @torch.inference_mode()
    def step():
        return model(hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False)[
            0
        ]

    timing = dict(warmup=args.warmup, repeat=args.repeat, device=device)
    reference = step().float()
    rows = [{"layout": "1 GPU, diffusers default", "ranks": 1, "ms": step_ms(step, **timing), "rel_l2": 0.0}]
    enable_npu_attention(model, "fa")
    single = step().float()
    rows.append(
        {
            "layout": "1 GPU, attnbridge fa",
            "ranks": 1,
            "ms": step_ms(step, **timing),
            "rel_l2": rel_l2(single, reference),
        }
    )
    disable_npu_attention(model)
    t1 = rows[1]["ms"]

    failed = []
    for name, ring, ulysses in layouts(world, config["num_attention_heads"]):
        enable_npu_attention(model, "fa", ring_degree=ring, ulysses_degree=ulysses)
        try:
            error = max_over_ranks(rel_l2(step().float(), reference), device)
            ms = step_ms(step, **timing)
        finally:
            disable_npu_attention(model)
        rows.append(
            {"layout": name, "ring": ring, "ulysses": ulysses, "ranks": world, "ms": ms, "rel_l2": error}
        )
        if error > tol:
            failed.append(name)

    for row in rows:
        row["efficiency"] = round(t1 / (row["ranks"] * row["ms"]), 3)
        row["speedup vs default"] = round(rows[0]["ms"] / row["ms"], 3)
        row["ms"] = round(row["ms"], 2)
        row["rel_l2"] = f"{row['rel_l2']:.2e}"
        row["check"] = "ok" if float(row["rel_l2"]) <= tol else "MISMATCH"
    if rank == 0:
        print(
            f"device: {device_name()} x {world}  tokens {tokens}  dtype {dtype}  layers {config['num_layers']}  "
            f"rel-L2 vs the 1-GPU default step, tol {tol:g}  efficiency = t1(fa) / (N * tN)"
        )
        print_table(rows, ["layout", "ranks", "ms", "efficiency", "speedup vs default", "rel_l2", "check"])
        write_json(
            args.out,
            {
                "diffusers": diffusers.__version__,
                "tokens": tokens,
                "latent": [16, frames, height, width],
                "world_size": world,
                "collective": info.backend,
                "warmup": args.warmup,
                "repeat": args.repeat,
                "tol": tol,
                "config": {k: str(v) for k, v in config.items()},
                "rows": rows,
            },
            kind="cp_wan",
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    if failed:
        raise SystemExit(f"rank {rank}: outputs differ from the single-GPU step beyond {tol:g}: {failed}")


if __name__ == "__main__":
    main()
