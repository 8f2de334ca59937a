"""The pooled top-k baseline the selection scripts compare ``block_sparse`` with: per row the best
key blocks by pooled score, plus forced ones (the diagonal, and the layout's dense blocks)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnbridge.attention.options import kept_count  # noqa: E402
from attnbridge.attention.sparse.layout import SparseLayout, dense_block_flags  # noqa: E402
from attnbridge.attention.sparse.selection import BlockSelection, dense_selection  # noqa: E402


def dense_rows(layout: SparseLayout) -> tuple[int, ...]:
    """Query blocks that attend every key block (first frame, text)."""
    first = min(layout.first_frame_blocks, layout.text_start_block)
    return tuple(range(first)) + tuple(range(layout.text_start_block, layout.num_blocks))


def dense_blocks(layout: SparseLayout, device) -> torch.Tensor:
    """Bool ``[num_blocks]``: blocks that are dense rows and dense columns (first frame, text)."""
    return dense_block_flags(layout.num_blocks, layout.first_frame_blocks, layout.text_start_block, device)


def select_top_blocks(
    scores: torch.Tensor, sparsity: float, dense_blocks: torch.Tensor, num_dense: int
) -> BlockSelection:
    """Pooled top-k baseline of the selection scripts: per row the best :func:`row_budget` key blocks
    plus the forced ones (the diagonal, and the ``num_dense`` ``dense_blocks`` bool ``[nb]``, which
    are dense rows and columns), so the work is ``1 - sparsity`` of dense."""
    batch, heads, nq, nk = scores.shape
    device = scores.device
    keep = row_budget(sparsity, nq, nk, num_dense)
    if keep == nk:
        return dense_selection(batch, heads, nq, nk, device)
    cols = torch.arange(nk, device=device)
    rows = torch.arange(nq, device=device)
    forced = dense_blocks[None, :] | (rows[:, None] == cols[None, :])  # [nq, nk]
    ranked = scores.masked_fill(forced, float("inf"))
    top = ranked.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
    all_blocks = cols.to(torch.int32).expand(batch, heads, nq, nk)
    top = torch.nn.functional.pad(top, (0, nk - keep))
    dense_rows = dense_blocks[:nq, None]
    indices = torch.where(dense_rows, all_blocks, top)
    counts = torch.where(dense_blocks[:nq], nk, keep).to(torch.int32).expand(batch, heads, nq)
    return BlockSelection(indices.contiguous(), counts.contiguous(), nk)


def row_budget(sparsity: float, nq: int, nk: int, num_dense: int) -> int:
    """Blocks each non-dense row keeps so that all keep ``1 - sparsity`` of the pairs (at least its
    forced ones)."""
    total = kept_count(sparsity, nq * nk)
    other_rows = nq - num_dense
    keep = (total - num_dense * nk) // other_rows if other_rows > 0 else nk
    return min(nk, max(keep, num_dense + 1))
