"""The ``rain_fusion`` backend: RainFusion's adaptive sparse attention for video DiTs.

Each head picks its own pattern from pooled scores. Tokens of every frame are first regrouped into
8x8 spatial patches (64 consecutive tokens, so a 128-token block is two neighbouring patches of one
frame); block scores ``softmax(q̄ · k̄ᵀ · scale)`` then keep, per query block, every key block at or
above the ``ceil(nb * (1 - sparsity))``-th largest probability. A *spatial* head ends up keeping the
blocks of its own frame, a *temporal* head the same patch in other frames, a *textural* head a
scattered set; no head is forced into one of those shapes. First frame (video) and text (joint)
blocks are dense rows and columns; rules shared with ``block_sparse`` are in
:mod:`attnbridge.attention.sparse.layout`. The Ascend kernels and their arguments: ``docs/ascend.md``.
"""

from __future__ import annotations

import torch

from attnbridge.attention.registry import Backend
from attnbridge.attention.sparse.ascend import ASCEND_RAIN_FUSION
from attnbridge.attention.sparse.impl import Selector, SparseOptions
from attnbridge.attention.sparse.layout import dense_block_flags
from attnbridge.attention.sparse.platforms import block_mask_platforms
from attnbridge.attention.sparse.selection import (
    BlockSelection,
    mask_to_selection,
    pooled_scores,
    threshold_mask,
)

#: Side of the square spatial patches tokens are regrouped into.
TILE = 8


def rain_fusion_order(grid: tuple[int, int, int]) -> torch.Tensor | None:
    """Gather order of the image tokens: each frame's 8x8 patches as 64 consecutive tokens. No change for one
    frame or frames smaller than 8x8. When H and W are multiples of 8 every frame is tiled; otherwise the
    first frame stays in raster order and each later frame lists its tiled aligned region, then the bottom
    rows ``H % 8`` x W, then the right strip (aligned H) x ``W % 8``."""
    frames, height, width = grid
    if frames == 1 or height < TILE or width < TILE:
        return None
    tokens = torch.arange(frames * height * width).view(frames, height, width)
    top, left = height - height % TILE, width - width % TILE

    def tiled(x: torch.Tensor) -> torch.Tensor:  # [F, top, left] -> [F, top * left] patch-major
        f = x.shape[0]
        return x.reshape(f, top // TILE, TILE, left // TILE, TILE).permute(0, 1, 3, 2, 4).reshape(f, -1)

    if top == height and left == width:
        return tiled(tokens).reshape(-1)
    later = tokens[1:]
    rest = torch.cat(
        [
            tiled(later[:, :top, :left]),
            later[:, top:, :].reshape(frames - 1, -1),
            later[:, :top, left:].reshape(frames - 1, -1),
        ],
        dim=1,
    )
    return torch.cat([tokens[0].reshape(-1), rest.reshape(-1)])


def select_rain_fusion(q, k, scale: float, options, layout) -> BlockSelection:
    """RainFusion's pooled-probability threshold mask, with the layout's dense blocks forced."""
    dense = (layout.first_frame_blocks, layout.text_start_block)
    return layout.select(_threshold_lists, q, k, scale, options.sparsity, *dense)


def _threshold_lists(q, k, scale, sparsity, first_frame_blocks, text_start_block, block_size, key_lengths):
    scores = pooled_scores(q, k, block_size, scale, key_lengths)
    dense_blocks = dense_block_flags(scores.shape[-1], first_frame_blocks, text_start_block, q.device)
    selection = mask_to_selection(threshold_mask(scores, sparsity, dense_blocks))
    return selection.indices, selection.counts, selection.kept_mask


THRESHOLD = Selector("RainFusion 8x8-patch reorder + pooled threshold", select_rain_fusion, rain_fusion_order)

BACKEND = Backend(
    "rain_fusion",
    "RainFusion adaptive spatial/temporal/textural sparsity",
    platforms=block_mask_platforms(THRESHOLD, ASCEND_RAIN_FUSION),
    options=SparseOptions,
    sparse=True,
    order=5,
)
