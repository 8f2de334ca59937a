"""VSA attention at the Wan2.1-1.3B 480p self-attention shape vs dense cuDNN SDPA, and tile-buffer reuse.

Shape: B=1, H=12, D=128, latent grid 21x30x52 (32,760 tokens), bf16, sparsity 0.875. Reports
  * the fine stage checked against float32 attention over the selected tiles, on a few query tiles;
  * median ms of dense cuDNN SDPA, of the whole ``vsa`` call and of its stages;
  * tile-buffer reuse: the buffer's data_ptr across calls, and CUDA allocations per call with reuse
    and with the buffer dropped before every call (the difference is what reuse saves).
Usage: ``python scripts/bench_vsa.py --out vsa.json`` on a GPU; ``--small`` for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_common import device_name, median_ms, print_table, rel_l2, write_json  # noqa: E402

from attnbridge.attention import AttentionContext, AttentionLayer  # noqa: E402
from attnbridge.attention.backends.vsa import (  # noqa: E402
    coarse_attention,
    combine,
    fine_attention,
    tile_qkv,
)
from attnbridge.attention.backends.vsa_tiling import TILE_TOKENS, tile_layout, topk_tiles  # noqa: E402


def dense_sdpa(q, k, v):
    backends = [SDPBackend.CUDNN_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)


def check_fine_stage(layout, qt, kt, vt, kv_indices, fine, scale, n_check):
    """rel. L2 error of the fine stage on the first ``n_check`` query tiles vs float32 attention over
    exactly their selected key tiles' real tokens."""
    errors = []
    key_valid = layout.key_valid
    for tile in range(min(n_check, layout.n_tiles)):
        rows = slice(tile * TILE_TOKENS, (tile + 1) * TILE_TOKENS)
        real_rows = key_valid[rows]
        for b in range(qt.shape[0]):
            for h in range(qt.shape[2]):
                kv_h = h // (qt.shape[2] // kt.shape[2])
                slots = (
                    kv_indices[b, h, tile].long()[:, None] * TILE_TOKENS
                    + torch.arange(TILE_TOKENS, device=qt.device)
                ).flatten()
                slots = slots[key_valid[slots]]
                q = qt[b, rows, h][real_rows].float()
                k, v = kt[b, slots, kv_h].float(), vt[b, slots, kv_h].float()
                ref = torch.softmax(q @ k.T * scale, -1) @ v
                errors.append(rel_l2(fine[b, rows, h][real_rows], ref))
    return max(errors)


def allocations_per_call(fn, layout, calls, *, drop_buffer):
    """CUDA allocations and bytes allocated per call of ``fn`` (after warm-up), and the buffer pointers."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    pointers = set()
    for _ in range(calls):
        if drop_buffer:
            layout.tile_buf = None
        fn()
        pointers.add(layout.tile_buf.data_ptr())
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    count = (after["allocation.all.allocated"] - before["allocation.all.allocated"]) / calls
    nbytes = (after["allocated_bytes.all.allocated"] - before["allocated_bytes.all.allocated"]) / calls
    return count, nbytes, len(pointers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--check-tiles", type=int, default=8, help="query tiles checked against float32")
    parser.add_argument("--calls", type=int, default=20, help="calls for the allocation count")
    parser.add_argument("--small", action="store_true", help="CPU smoke run at a tiny shape")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.small
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    grid = (5, 6, 7) if args.small else tuple(args.grid)
    heads, head_dim = (2, 64) if args.small else (args.heads, args.head_dim)
    seq = math.prod(grid)
    shape = (args.batch, seq, heads, head_dim)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
    scale = head_dim**-0.5

    layout = tile_layout(grid, device)
    topk = topk_tiles(args.sparsity, layout.n_tiles)
    context = AttentionContext(grid=grid)
    layer = AttentionLayer("vsa", sparsity=args.sparsity)

    def vsa_call():
        return layer(q, k, v, context=context)

    start = time.perf_counter()
    vsa_call()  # compiles the FlexAttention kernel
    if cuda:
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start

    qt, kt, vt = tile_qkv(layout, q, k, v)
    coarse, kv_indices = coarse_attention(layout, qt, kt, vt, scale=scale, topk=topk)
    fine = fine_attention(layout, qt, kt, vt, kv_indices, scale=scale)
    fine_error = check_fine_stage(layout, qt, kt, vt, kv_indices, fine, scale, args.check_tiles)

    dense_ms = median_ms(lambda: dense_sdpa(q, k, v))
    vsa_ms = median_ms(vsa_call)
    rows = [
        {"what": "dense SDPA " + ("cuDNN" if cuda else "math"), "ms": f"{dense_ms:.3f}", "vs dense": "1.00x"},
        {"what": f"vsa total (sparsity {args.sparsity}, top-{topk})", "ms": f"{vsa_ms:.3f}"},
        {"what": "  tile q,k,v (reused buffer)", "ms": f"{median_ms(lambda: tile_qkv(layout, q, k, v)):.3f}"},
        {
            "what": "  coarse (pool + tile attention + top-k)",
            "ms": f"{median_ms(lambda: coarse_attention(layout, qt, kt, vt, scale=scale, topk=topk)):.3f}",
        },
        {
            "what": "  fine (flex block-sparse)",
            "ms": f"{median_ms(lambda: fine_attention(layout, qt, kt, vt, kv_indices, scale=scale)):.3f}",
        },
        {"what": "  combine + untile", "ms": f"{median_ms(lambda: combine(layout, fine, coarse, None)):.3f}"},
    ]
    rows[1]["vs dense"] = f"{dense_ms / vsa_ms:.2f}x"

    reuse = {"buffer_bytes": layout.tile_buf.numel() * layout.tile_buf.element_size()}
    if cuda:
        count, nbytes, pointers = allocations_per_call(vsa_call, layout, args.calls, drop_buffer=False)
        count_fresh, nbytes_fresh, _ = allocations_per_call(vsa_call, layout, args.calls, drop_buffer=True)
        vsa_call()  # leave a buffer in place
        reuse.update(
            allocations_per_call=count,
            bytes_allocated_per_call=nbytes,
            distinct_buffer_pointers=pointers,
            allocations_per_call_without_reuse=count_fresh,
            bytes_allocated_per_call_without_reuse=nbytes_fresh,
        )
    else:
        pointers = set()
        for _ in range(3):
            vsa_call()
            pointers.add(layout.tile_buf.data_ptr())
        reuse["distinct_buffer_pointers"] = len(pointers)

    print(
        f"{device_name()}  grid {grid} = {seq} tokens, {layout.n_tiles} tiles, B={args.batch} H={heads} D={head_dim} {dtype}"
    )
    print(
        f"first vsa call (FlexAttention compile): {first_call_s:.1f} s; fine-stage max rel. L2 error: {fine_error:.2e}"
    )
    print_table(rows, ["what", "ms", "vs dense"])
    print("tile buffer reuse:", ", ".join(f"{key}={value}" for key, value in reuse.items()))
    write_json(
        args.out,
        {
            "shape": {"batch": args.batch, "grid": grid, "tokens": seq, "heads": heads, "head_dim": head_dim},
            "dtype": str(dtype),
            "sparsity": args.sparsity,
            "n_tiles": layout.n_tiles,
            "topk": topk,
            "first_call_s": first_call_s,
            "fine_stage_max_rel_l2": fine_error,
            "timings_ms": {row["what"].strip(): float(row["ms"]) for row in rows},
            "tile_buffer": reuse,
        },
    )


if __name__ == "__main__":
    main()
