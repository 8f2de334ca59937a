"""The ``block_sparse`` backend: per head, each query block keeps its top-scoring 128-token key
blocks, ranked by mean-pooled ``q̄ · k̄ᵀ · scale``; attention runs on exactly those blocks.

The diagonal block and the first latent frame (video) or the text (joint attention) are always
kept; dense steps and cross-attention run dense ``fa`` (rules in :mod:`.sparse_common`).
``sparsity`` is the fraction of block pairs skipped per head: the forced blocks, dense first-frame
rows included, are paid from the ``1 - sparsity`` budget and the rest is shared evenly by the other
query blocks (:func:`~.block_select.row_budget`), so the work is ``1 - sparsity`` of dense. At
Wan 480p the first frame alone is about 10% of the blocks, so at sparsity 0.9 the other rows keep
only their forced blocks.

* CPU / CUDA: :class:`FlexBlockSparseImpl`, FlexAttention with a BlockMask built from the lists.
  On GPUs, when the other rows keep at most 1/8 of the key blocks, the dense rows run split into
  chunks merged by LSE (:mod:`.row_split`), so they do not finish alone at the end of the grid.
* Ascend: :class:`NpuBlockSparseImpl`, sgl-kernel-npu's ``attentions`` block-sparse kernel fed
  *our* mask, so both platforms attend the same blocks. The kernel is registered as
  ``torch.ops.attentions.block_sparse_attention`` in older builds and as
  ``ada_block_sparse_attention`` (same schema) in newer ones; there is no
  ``sparse_block_attention``. sglang pairs it with ``sparse_block_estimate`` (a strided estimate);
  we skip the estimate and pass our own selection.
"""

from __future__ import annotations

import torch

from attnbridge.attention.backends.block_select import (
    BlockSelection,
    pooled_scores,
    row_budget,
    select_top_blocks,
)
from attnbridge.attention.backends.flex_block_sparse import block_sparse_attention
from attnbridge.attention.backends.sparse_common import (
    BLOCK_SIZE,
    SparseImplBase,
    SparseLayout,
    compiled_on_cuda,
    dense_block_flags,
)
from attnbridge.attention.contract import HALF_DTYPES
from attnbridge.errors import BackendUnavailableError

#: The Ascend kernels' "no window" value for pre/next tokens (sglang's constant; not 2**31 - 1).
NPU_NO_WINDOW = 214748647
#: Op names of the Ascend block-sparse kernel, newest first; both take (mask, count table).
NPU_BLOCK_SPARSE_OPS = ("ada_block_sparse_attention", "block_sparse_attention")
#: Dense rows run split (:mod:`.row_split`) when the other rows keep at most this fraction of the
#: key blocks: at Wan 480p, sparsity >= 0.83 (rows keep 32 of 256 blocks at 0.83, 14 at 0.9). On
#: an H200 the split saved about 2% of the kernel at 0.9 and cost about 4% at 0.5 (rows keep 121);
#: at 0.75 (53) the difference was below run-to-run noise. 0.85 was not timed per call.
SPLIT_DENSE_ROWS_BELOW = 1 / 8


def select_block_sparse(q, k, scale: float, sparsity: float, layout: SparseLayout) -> BlockSelection:
    """Top-k selection on pooled scores, with the layout's dense blocks and the diagonal forced."""
    select = compiled_on_cuda(_top_k_lists, q.device)
    indices, counts = select(
        q, k, scale, sparsity, layout.first_frame_blocks, layout.text_start_block, layout.num_dense_blocks
    )
    keep = row_budget(sparsity, layout.num_blocks, layout.num_blocks, layout.num_dense_blocks)
    return BlockSelection(indices, counts, layout.num_blocks, row_count=keep)


def _top_k_lists(q, k, scale, sparsity, first_frame_blocks, text_start_block, num_dense):
    scores = pooled_scores(q, k, BLOCK_SIZE, scale)
    dense_blocks = dense_block_flags(scores.shape[-1], first_frame_blocks, text_start_block, q.device)
    selection = select_top_blocks(scores, sparsity, dense_blocks, num_dense)
    return selection.indices, selection.counts


def run_flex(q, k, v, selection: BlockSelection, scale: float, return_lse: bool, layout: SparseLayout):
    """The FlexAttention block-sparse kernel over ``selection``; when the other rows are short, the
    layout's dense rows run split into chunks on GPUs, so they do not finish last (:mod:`.row_split`)."""
    short = (
        selection.row_count is not None and selection.row_count <= SPLIT_DENSE_ROWS_BELOW * layout.num_blocks
    )
    return block_sparse_attention(
        q,
        k,
        v,
        selection.indices,
        selection.counts,
        block_size=BLOCK_SIZE,
        scale=scale,
        return_lse=return_lse,
        long_rows=layout.dense_rows if short else (),
    )


class FlexBlockSparseImpl(SparseImplBase):
    """Top-k block selection + FlexAttention block-sparse kernel (compiled on CUDA)."""

    kernel = "top-k pooled block selection + FlexAttention BlockMask (compiled on CUDA)"

    def select(self, q, k, scale, sparsity, layout):
        return select_block_sparse(q, k, scale, sparsity, layout)

    def run_sparse(self, q, k, v, selection, scale, return_lse, layout):
        return run_flex(q, k, v, selection, scale, return_lse, layout)


def find_attentions_op(ops: object, names: tuple[str, ...], backend: str):
    """The first of ``names`` registered under ``torch.ops.attentions``, or an error naming them."""
    for name in names:
        try:
            return getattr(ops, name)
        except (AttributeError, RuntimeError):
            continue
    raise BackendUnavailableError(
        backend,
        "npu",
        f"the installed 'attentions' package registers none of {', '.join(names)}",
        "pip install -U sgl-kernel-npu",
    )


def npu_sparse_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[B, N, nq, nk]`` -> the kernel's int8 mask ``[B, N, nq, align32(nk)]`` (zero padded)
    and int32 count table ``[B, N, nq]`` (kept blocks per row), as ``sparse_block_estimate`` makes."""
    nk = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.int8), (0, -nk % 32))
    return padded.contiguous(), mask.sum(dim=-1, dtype=torch.int32)


class NpuBlockSparseImpl(SparseImplBase):
    """Top-k block selection + sgl-kernel-npu's block-sparse attention kernel (BNSD)."""

    kernel = "top-k pooled block selection + torch.ops.attentions.(ada_)block_sparse_attention (BNSD)"
    supported_dtypes = HALF_DTYPES
    supported_head_sizes = (32, 64, 96, 128)
    npu = True
    sparse_lse = False  # the kernel returns no LSE: LSE requests run dense FIA

    @classmethod
    def check_available(cls, platform: str) -> None:
        from attnbridge.platforms.npu import load_attentions_ops

        find_attentions_op(load_attentions_ops("block_sparse"), NPU_BLOCK_SPARSE_OPS, "block_sparse")

    def select(self, q, k, scale, sparsity, layout):
        return select_block_sparse(q, k, scale, sparsity, layout)

    def run_sparse(self, q, k, v, selection, scale, return_lse, layout):
        from attnbridge.platforms.npu import load_attentions_ops

        op = find_attentions_op(load_attentions_ops("block_sparse"), NPU_BLOCK_SPARSE_OPS, "block_sparse")
        mask, counts = npu_sparse_mask(selection.mask())
        # BNSD, contiguous: the BSND path of this kernel has accuracy issues (sglang's note).
        qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        out = op(
            qb,
            kb,
            vb,
            sparse_mask=mask,
            sparse_count_table=counts,
            input_layout="BNSD",
            sparse_size=BLOCK_SIZE,
            num_heads=q.shape[2],
            num_key_value_heads=k.shape[2],
            scale_value=scale,
            causal=False,
            inner_precise=1,
            pre_tokens=NPU_NO_WINDOW,
            next_tokens=NPU_NO_WINDOW,
        )
        return out.transpose(1, 2)
