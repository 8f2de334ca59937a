"""How good can 128-token block selection get on bench_sparse.py's structured inputs? (CPU is fine)

Computes the exact attention mass of every (query block, key block) pair and compares, at one
sparsity and the same number of kept blocks per head, the rel-L2 error vs dense attention of:

* ``pooled top-k``: ``block_sparse``'s former selection (mean-pooled q . k scores, diagonal and
  first frame forced, per-row budget);
* ``block_sparse``: the backend's selection now (estimated block mass, no forced blocks, placed
  per head; ``scripts/selection_quality.py`` compares it in more detail);
* ``row oracle``: the former rule's per-row budget and forced blocks, rows ranked by exact mass (a
  reference for the ranking, not a strict bound: minimising the output error directly can do a
  little better);
* ``global oracle``: the forced blocks, then the pairs of highest exact mass anywhere in the head
  (rows get different budgets);

each in raster token order and in ``rain_fusion``'s 8x8-patch order. Full Wan 480p grid, fewer
heads than the model (each head of the generator is an independent field, so the error per head
has the same distribution).

    python scripts/oracle_block_selection.py --heads 2 --sparsity 0.75 --out oracle.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import print_table, write_json  # noqa: E402
from bench_sparse import FULL, structured_qkv  # noqa: E402
from pooled_baseline import dense_blocks, dense_rows, select_top_blocks  # noqa: E402

from attnbridge.attention.backends.block_sparse import BlockSparseOptions, select_block_sparse  # noqa: E402
from attnbridge.attention.backends.rain_fusion import rain_fusion_order  # noqa: E402
from attnbridge.attention.contract import AttentionContext  # noqa: E402
from attnbridge.attention.sparse.layout import resolve_layout  # noqa: E402
from attnbridge.attention.sparse.selection import (  # noqa: E402
    indices_to_mask,
    pooled_scores,
)

BLOCK = 128


def block_mass(q, k, scale):
    """Exact attention mass per (query block, key block), ``[H, nb, nb]``; q, k ``[H, S, D]``."""
    heads, seq, _ = q.shape
    nb = math.ceil(seq / BLOCK)
    mass = torch.zeros(heads, nb, nb)
    for row in range(nb):
        probs = torch.softmax(q[:, row * BLOCK : (row + 1) * BLOCK] @ k.transpose(1, 2) * scale, -1)
        mass[:, row] = (
            torch.nn.functional.pad(probs.sum(1), (0, nb * BLOCK - seq)).view(heads, nb, BLOCK).sum(-1)
        )
    return mass


def masked_rel_l2(q, k, v, keep, scale):
    """rel-L2 of attention restricted to ``keep`` ``[H, nb, nb]`` against dense, over all rows."""
    seq = q.shape[1]
    err = ref_norm = 0.0
    for row in range(keep.shape[1]):
        scores = q[:, row * BLOCK : (row + 1) * BLOCK] @ k.transpose(1, 2) * scale
        dense = torch.softmax(scores, -1) @ v
        visible = keep[:, row].repeat_interleave(BLOCK, -1)[:, None, :seq]
        sparse = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v
        err += float((sparse - dense).pow(2).sum())
        ref_norm += float(dense.pow(2).sum())
    return math.sqrt(err / ref_norm)


def global_oracle(mass, forced, total):
    """Forced blocks plus the highest-mass remaining pairs of each head, ``total`` pairs in all."""
    keep = forced.expand_as(mass).clone()
    for head in range(mass.shape[0]):
        extra = max(0, total - int(keep[head].sum()))
        top = mass[head].masked_fill(forced, -1.0).flatten().topk(extra).indices
        keep[head].view(-1)[top] = True
    return keep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    grid, dim = FULL["grid"], FULL["dim"]
    scale = dim**-0.5
    q, k, v = structured_qkv(grid, args.heads, dim, device="cpu", dtype=FULL["dtype"])
    layout = resolve_layout("block_sparse", q, AttentionContext(kind="self", grid=grid, step=10))
    nb = layout.num_blocks
    dense = dense_blocks(layout, "cpu")
    forced = dense[None, :] | dense[:, None] | torch.eye(nb, dtype=torch.bool)
    rows = []
    for order_name, order in (("raster", None), ("8x8 patches", rain_fusion_order(grid))):
        qo, ko, vo = (x if order is None else x.index_select(1, order) for x in (q, k, v))
        scores = pooled_scores(qo, ko, layout.block_size, scale)
        pooled_keep = select_top_blocks(scores, args.sparsity, dense, len(dense_rows(layout))).mask()[0]
        current = select_block_sparse(qo, ko, scale, BlockSparseOptions(sparsity=args.sparsity), layout)
        current_keep = indices_to_mask(current.indices, current.counts, nb)[0]
        qh, kh, vh = (x[0].float().transpose(0, 1).contiguous() for x in (qo, ko, vo))  # [H, S, D]
        mass = block_mass(qh, kh, scale)
        row = select_top_blocks(mass[None], args.sparsity, dense, len(dense_rows(layout)))
        row_keep = indices_to_mask(row.indices, row.counts, nb)[0]
        total = int(row_keep[0].sum())
        for name, keep in (
            ("pooled top-k", pooled_keep),
            ("block_sparse", current_keep),
            ("row oracle", row_keep),
            ("global oracle", global_oracle(mass, forced, total)),
        ):
            rows.append(
                {
                    "order": order_name,
                    "selection": name,
                    "kept": round(float(keep.float().mean()), 4),
                    "mass kept": round(float((mass * keep).sum() / mass.sum()), 4),
                    "rel_l2": round(masked_rel_l2(qh, kh, vh, keep, scale), 4),
                }
            )
            print(rows[-1], flush=True)
    print(f"grid {grid}, {args.heads} heads of {dim}, sparsity {args.sparsity}")
    print_table(rows, list(rows[0]))
    write_json(
        args.out,
        {"grid": list(grid), "heads": args.heads, "sparsity": args.sparsity, "rows": rows},
        kind="oracle",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
