"""How much the dense first-frame rows unbalance the block-sparse kernel (Wan 480p, GPU).

For each sparsity, times the FlexAttention kernel of ``block_sparse``'s own selection with the
dense rows unsplit and split (``row_split.py``), and a *balanced reference*: the same number of
key blocks per head spread evenly over all rows (no dense rows), what a perfectly balanced
schedule of the same work would take. Kernel only (selection excluded), median of ``do_bench``.

    python scripts/bench_row_balance.py --out row_balance.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import device_name, print_table, write_json  # noqa: E402
from bench_sparse import FULL, median_ms, structured_qkv  # noqa: E402

from attnbridge.attention.backends import flex_block_sparse  # noqa: E402
from attnbridge.attention.backends.block_select import BlockSelection  # noqa: E402
from attnbridge.attention.backends.block_sparse import run_flex, select_block_sparse  # noqa: E402
from attnbridge.attention.backends.sparse_common import SparseStepMetadata, resolve_layout  # noqa: E402
from attnbridge.attention.contract import AttentionContext  # noqa: E402


def balanced(selection: BlockSelection) -> BlockSelection:
    """As many blocks per head as ``selection``, spread as evenly as possible over the rows (counts
    differ by at most one; cyclic runs of key blocks)."""
    heads, nb = selection.counts.shape[1], selection.num_kv_blocks
    per_row, extra = divmod(int(selection.counts[0].sum()) // heads, nb)
    device = selection.counts.device
    rows = (torch.arange(nb, device=device)[:, None] + torch.arange(nb, device=device)) % nb
    counts = per_row + (torch.arange(nb, device=device) < extra).int()
    counts = counts.expand(1, heads, nb).contiguous()
    return BlockSelection(rows.int().expand(1, heads, nb, nb).contiguous(), counts, nb)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.75, 0.9])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_row_balance.py times GPU kernels: no CUDA device here")
    grid, scale = FULL["grid"], FULL["dim"] ** -0.5
    q, k, v = structured_qkv(grid, FULL["heads"], FULL["dim"], device="cuda", dtype=FULL["dtype"])
    context = AttentionContext(kind="self", grid=grid, step=10)
    chunk = flex_block_sparse.GPU_ROW_CHUNK or 32
    rows = []
    for sparsity in args.sparsity:
        metadata = SparseStepMetadata(step=10, sparsity=sparsity, skip_first_steps=0, grid=grid)
        layout = resolve_layout("block_sparse", q, metadata, context)
        selection = select_block_sparse(q, k, scale, sparsity, layout)
        forced_split = dataclasses.replace(selection, row_count=0)  # row_count 0: always split
        timings = {}
        for name, sel, row_chunk in (
            ("unsplit", selection, None),
            (f"split (chunk {chunk})", forced_split, chunk),
            ("balanced", balanced(selection), None),
        ):
            flex_block_sparse.GPU_ROW_CHUNK = row_chunk
            timings[name] = round(median_ms(lambda: run_flex(q, k, v, sel, scale, False, layout)), 3)  # noqa: B023
        flex_block_sparse.GPU_ROW_CHUNK = chunk
        rows.append({"sparsity": sparsity, **timings})
    print(f"device: {device_name()}  grid {grid}  kernel ms (selection excluded)")
    print_table(rows, list(rows[0]))
    write_json(args.out, {"grid": list(grid), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
