"""The ``block_sparse`` backend: per head, each query block keeps its top-scoring 128-token key
blocks, ranked by mean-pooled ``q̄ · k̄ᵀ · scale``; attention runs on exactly those blocks.

The diagonal block and the first latent frame (video) or the text (joint attention) are always
kept; dense steps and cross-attention run dense ``fa`` (rules in :mod:`attnbridge.attention.sparse.layout`).
``sparsity`` is the fraction of block pairs skipped per head: the forced blocks, dense first-frame
rows included, are paid from the ``1 - sparsity`` budget and the rest is shared evenly by the other
query blocks (:func:`~attnbridge.attention.sparse.selection.row_budget`), so the work is
``1 - sparsity`` of dense. At Wan 480p the first frame alone is about 10% of the blocks, so at
sparsity 0.9 the other rows keep only their forced blocks.

* CPU: FlexAttention with an exact block mask (the reference); CUDA: attnbridge's Triton kernel,
  which walks each query block's list of key blocks, longest lists first.
* Ascend: sgl-kernel-npu's block-sparse kernel fed *our* selection, so both platforms attend the
  same blocks.
"""

from __future__ import annotations

from attnbridge.attention.registry import Backend, Unavailable
from attnbridge.attention.sparse.ascend import ASCEND_BLOCK_SPARSE
from attnbridge.attention.sparse.flex import FLEX
from attnbridge.attention.sparse.impl import Selector, SparseOptions, compose
from attnbridge.attention.sparse.layout import compiled_on_gpu, dense_block_flags
from attnbridge.attention.sparse.selection import BlockSelection, pooled_scores, select_top_blocks
from attnbridge.attention.sparse.triton_kernel import TRITON


def select_block_sparse(q, k, scale: float, options, layout) -> BlockSelection:
    """Top-k selection on pooled scores, with the layout's dense blocks and the diagonal forced."""
    select = compiled_on_gpu(_top_k_lists, q.device)
    indices, counts = select(
        q,
        k,
        scale,
        options.sparsity,
        layout.first_frame_blocks,
        layout.text_start_block,
        layout.num_dense_blocks,
        layout.block_size,
        layout.key_lengths,
    )
    return BlockSelection(indices, counts, layout.num_blocks)


def _top_k_lists(
    q, k, scale, sparsity, first_frame_blocks, text_start_block, num_dense, block_size, key_lengths
):
    scores = pooled_scores(q, k, block_size, scale, key_lengths)
    dense_blocks = dense_block_flags(scores.shape[-1], first_frame_blocks, text_start_block, q.device)
    selection = select_top_blocks(scores, sparsity, dense_blocks, num_dense)
    return selection.indices, selection.counts


TOP_K = Selector("top-k pooled", select_block_sparse)

BACKEND = Backend(
    "block_sparse",
    "top-k 128-token block-sparse attention",
    platforms={
        "cpu": compose(TOP_K, FLEX),
        "cuda": compose(TOP_K, TRITON),
        "musa": Unavailable("FlexAttention (Triton) is not available for MUSA; use 'sdpa', 'fa' or 'sage'"),
        "npu": compose(TOP_K, ASCEND_BLOCK_SPARSE),
    },
    options=SparseOptions,
    sparse=True,
    order=4,
)
