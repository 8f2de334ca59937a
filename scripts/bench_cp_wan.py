"""Sequence-parallel DiT transformer step over N GPUs: every ring x Ulysses layout, dense and sparse.

Builds the real diffusers transformer with a real architecture (random weights, same seed on every
rank): Wan2.1 1.3B or 14B at 720p (16 x 21 x 90 x 160 latent -> 21 x 45 x 80 = 75,600 tokens), or
Qwen-Image at 2048x2048 (16,384 image tokens, 256 text tokens); bf16. Every rank first runs the
single-GPU step itself (unpatched diffusers, then attnbridge ``fa``), then each parallel layout
through ``enable_npu_attention(model, "fa", ring_degree=..., ulysses_degree=...)``; each rank checks
its gathered output against the single-GPU output (rel-L2, max over ranks) and the step is timed
(median, max over ranks). Scaling efficiency is ``t1 / (N * tN)`` with ``t1`` the single-GPU
attnbridge ``fa`` step. With ``--sparse block_sparse:0.85`` the sparse backend runs on one GPU and
under Ulysses N (each rank holds whole sequences for its heads, so the selection is the same) and is
checked against the one-GPU sparse step; a ring with a sparse backend is refused, and the refusal is
recorded.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        accelerate launch --num_processes 8 scripts/bench_cp_wan.py --model wan-14b \
        --sparse block_sparse:0.85 --out cp_wan14b_8gpu.json
    ... scripts/bench_cp_wan.py --model qwen-image-2048 --out cp_qwen_image_8gpu.json
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
from bench_common import QWEN_IMAGE, WAN_1_3B, device_name, print_table, rel_l2, wall_ms, write_json  # noqa: E402

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
#: Wan2.1-T2V-14B: 40 heads of 128 (dim 5120), ffn 13824, 40 layers.
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
QWEN_SMALL = {**QWEN_IMAGE, "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 4}
QWEN_SMALL.update(joint_attention_dim=64, axes_dims_rope=(8, 12, 12))


def layouts(world: int, heads: int) -> list[tuple[str, int, int]]:
    """(name, ring_degree, ulysses_degree) worth timing on ``world`` ranks."""
    if world == 1:
        return []
    found = [(f"ring {world}", world, 1)]
    if heads % world == 0:
        found.append((f"ulysses {world}", 1, world))
    for ring in (2, 4):  # ring x Ulysses: 2x2 on 4 ranks; 2x4 and 4x2 on 8
        ulysses = world // ring
        if 1 < ulysses and ring * ulysses == world and heads % ulysses == 0:
            found.append((f"ring {ring} x ulysses {ulysses}", ring, ulysses))
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
    parser.add_argument("--model", default="wan-1.3b", choices=("wan-1.3b", "wan-14b", "qwen-image-2048"))
    parser.add_argument("--image", type=int, default=2048, help="Qwen-Image side in pixels")
    parser.add_argument("--sparse", default=None, help="also a sparse backend, e.g. block_sparse:0.85")
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

    info = init_distributed()
    device, rank, world = info.device, info.rank, info.world_size
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)  # the same inputs on every rank
    if args.model.startswith("qwen-image"):
        from diffusers import QwenImageTransformer2DModel

        config = QWEN_SMALL if args.small else QWEN_IMAGE
        side = 8 if args.small else args.image // 16  # 8x VAE, 2x2 packing
        text_tokens = 7 if args.small else 256
        tokens = side * side
        with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
            model = QwenImageTransformer2DModel(**config).to(device=device, dtype=dtype).eval()
        inputs = {
            "hidden_states": torch.randn(1, tokens, config["in_channels"], generator=gen),
            "encoder_hidden_states": torch.randn(
                1, text_tokens, config["joint_attention_dim"], generator=gen
            ),
            "timestep": torch.tensor([0.5]),
            "img_shapes": [[(1, side, side)]],
        }
        latent_shape = [1, side, side]
    else:
        from diffusers import WanTransformer3DModel

        config = WAN_SMALL if args.small else (WAN_14B if args.model == "wan-14b" else WAN_1_3B)
        frames, height, width = (3, 6, 10) if args.small else (args.frames, args.height, args.width)
        tokens = frames * (height // 2) * (width // 2)
        with torch.device(device):
            model = WanTransformer3DModel(**config).to(device=device, dtype=dtype).eval()
        inputs = {
            "hidden_states": torch.randn(1, 16, frames, height, width, generator=gen),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 512, config["text_dim"], generator=gen),
        }
        latent_shape = [16, frames, height, width]
    inputs = {
        k: v.to(device, dtype if v.is_floating_point() and k != "timestep" else v.dtype)
        if torch.is_tensor(v)
        else v
        for k, v in inputs.items()
    }
    if dist.is_initialized():  # every rank must hold exactly rank 0's weights
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)

    @torch.inference_mode()
    def step():
        return model(**inputs, return_dict=False)[0]

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

    refusals = {}
    if args.sparse:
        backend, _, sparsity = args.sparse.partition(":")
        options = {"sparsity": float(sparsity)} if sparsity else {}
        enable_npu_attention(model, backend, **options)
        sparse_single = step().float()
        rows.append(
            {
                "layout": f"1 GPU, {args.sparse}",
                "ranks": 1,
                "ms": step_ms(step, **timing),
                "rel_l2": rel_l2(sparse_single, reference),
            }
        )
        disable_npu_attention(model)
        if world > 1 and config["num_attention_heads"] % world == 0:
            enable_npu_attention(model, backend, ulysses_degree=world, **options)
            try:
                error = max_over_ranks(rel_l2(step().float(), sparse_single), device)
                ms = step_ms(step, **timing)
            finally:
                disable_npu_attention(model)
            rows.append(
                {
                    "layout": f"ulysses {world}, {args.sparse}",
                    "ulysses": world,
                    "ranks": world,
                    "ms": ms,
                    "rel_l2": error,
                }
            )
            if error > tol:
                failed.append(rows[-1]["layout"])
        if world > 1:
            try:
                enable_npu_attention(model, backend, ring_degree=world, **options)
                disable_npu_attention(model)
                refusals[f"ring {world}, {args.sparse}"] = "accepted"
            except ValueError as error:
                refusals[f"ring {world}, {args.sparse}"] = str(error)

    for row in rows:
        row["efficiency"] = round(t1 / (row["ranks"] * row["ms"]), 3)
        row["speedup vs default"] = round(rows[0]["ms"] / row["ms"], 3)
        row["ms"] = round(row["ms"], 2)
        row["rel_l2"] = f"{row['rel_l2']:.2e}"
        row["check"] = "ok" if float(row["rel_l2"]) <= tol else "MISMATCH"
    if rank == 0:
        print(
            f"device: {device_name()} x {world}  {args.model}  tokens {tokens}  dtype {dtype}  layers {config['num_layers']}  "
            f"rel-L2 vs the 1-GPU default step, tol {tol:g}  efficiency = t1(fa) / (N * tN)"
        )
        print_table(rows, ["layout", "ranks", "ms", "efficiency", "speedup vs default", "rel_l2", "check"])
        for layout, why in refusals.items():
            print(f"{layout}: {why}")
        write_json(
            args.out,
            {
                "diffusers": diffusers.__version__,
                "model": args.model,
                "tokens": tokens,
                "latent": latent_shape,
                "refusals": refusals,
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
