"""The ``rain_fusion`` backend: RainFusion's adaptive sparse attention for video DiTs.

Each head picks its own pattern from pooled scores. Tokens of every frame are first regrouped into
8x8 spatial patches (64 consecutive tokens, so a 128-token block is two neighbouring patches of one
frame); block scores ``softmax(q̄ · k̄ᵀ · scale)`` then keep, per query block, every key block at or
above the ``ceil(nb * (1 - sparsity))``-th largest probability. A *spatial* head ends up keeping the
blocks of its own frame, a *temporal* head the same patch in other frames, a *textural* head a
scattered set; no head is forced into one of those shapes. First frame (video) and text (joint)
blocks are dense rows and columns; rules shared with ``block_sparse`` are in :mod:`.sparse_common`.

* CPU / CUDA: :class:`FlexRainFusionImpl`, the mask runs through the FlexAttention block-sparse path.
* Ascend: :class:`NpuRainFusionImpl`, ``torch_npu.npu_block_sparse_attention`` (BNSD, int8 mask)
  where torch_npu has it, else sgl-kernel-npu's ``torch.ops.attentions.rainfusionattention`` (TND,
  index lists). That kernel takes one index list for the whole batch, so it is called per batch
  element (sglang used batch 0's mask for every element).
"""

from __future__ import annotations

import torch

from attnbridge.attention.backends.block_select import (
    BlockSelection,
    mask_to_selection,
    pooled_scores,
    threshold_mask,
)
from attnbridge.attention.backends.block_sparse import run_flex
from attnbridge.attention.backends.sparse_common import (
    BLOCK_SIZE,
    SparseImplBase,
    SparseLayout,
    compiled_on_cuda,
    dense_block_flags,
)
from attnbridge.attention.contract import HALF_DTYPES

#: Side of the square spatial patches tokens are regrouped into.
TILE = 8


def rain_fusion_order(grid: tuple[int, int, int]) -> torch.Tensor | None:
    """Gather order of the image tokens: each frame's 8x8 patches as 64 consecutive tokens.

    No change for one frame or frames smaller than 8x8. When H and W are multiples of 8 every frame
    is tiled; otherwise the first frame stays in raster order and each later frame lists its tiled
    aligned region, then the bottom rows ``H % 8`` x W, then the right strip (aligned H) x ``W % 8``.
    """
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


def select_rain_fusion(q, k, scale: float, sparsity: float, layout: SparseLayout) -> BlockSelection:
    """RainFusion's pooled-probability threshold mask, with the layout's dense blocks forced."""
    select = compiled_on_cuda(_threshold_lists, q.device)
    indices, counts, mask = select(q, k, scale, sparsity, layout.first_frame_blocks, layout.text_start_block)
    return BlockSelection(indices, counts, layout.num_blocks, kept_mask=mask)


def _threshold_lists(q, k, scale, sparsity, first_frame_blocks, text_start_block):
    scores = pooled_scores(q, k, BLOCK_SIZE, scale)
    dense_blocks = dense_block_flags(scores.shape[-1], first_frame_blocks, text_start_block, q.device)
    selection = mask_to_selection(threshold_mask(scores, sparsity, dense_blocks))
    return selection.indices, selection.counts, selection.kept_mask


class FlexRainFusionImpl(SparseImplBase):
    """RainFusion's mask on the FlexAttention block-sparse path (compiled on CUDA)."""

    kernel = "RainFusion 8x8-patch reorder + pooled threshold mask + FlexAttention BlockMask"
    image_order = rain_fusion_order

    def select(self, q, k, scale, sparsity, layout):
        return select_rain_fusion(q, k, scale, sparsity, layout)

    def run_sparse(self, q, k, v, selection, scale, return_lse, layout):
        return run_flex(q, k, v, selection, scale, return_lse, layout)


def _inner_precise(torch_npu) -> int:
    """4 on Ascend 950 (A5), else 0: bf16 needs 0 (fp32 softmax) on the other chips."""
    from attnbridge.platforms.npu import is_ascend_a5

    return 4 if is_ascend_a5(torch_npu) else 0


class NpuRainFusionImpl(SparseImplBase):
    """RainFusion's mask on Ascend's block-sparse kernel (torch_npu, or the ``attentions`` package)."""

    kernel = "RainFusion mask + torch_npu.npu_block_sparse_attention (or attentions.rainfusionattention)"
    supported_dtypes = HALF_DTYPES
    supported_head_sizes = (64, 128)
    npu = True
    sparse_lse = False  # kept simple: LSE requests (ring attention) run dense FIA
    image_order = rain_fusion_order

    @classmethod
    def check_available(cls, platform: str) -> None:
        from attnbridge.platforms.npu import load_attentions_ops, load_torch_npu

        if not hasattr(load_torch_npu("rain_fusion"), "npu_block_sparse_attention"):
            load_attentions_ops("rain_fusion")

    def select(self, q, k, scale, sparsity, layout):
        return select_rain_fusion(q, k, scale, sparsity, layout)

    def run_sparse(self, q, k, v, selection, scale, return_lse, layout):
        from attnbridge.platforms.npu import load_torch_npu

        torch_npu = load_torch_npu("rain_fusion")
        if hasattr(torch_npu, "npu_block_sparse_attention"):
            return self._torch_npu_kernel(torch_npu, q, k, v, selection, scale)
        return self._attentions_kernel(q, k, v, selection, scale)

    @staticmethod
    def _torch_npu_kernel(torch_npu, q, k, v, selection, scale):
        batch, seq = q.shape[0], q.shape[1]
        qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        out, _ = torch_npu.npu_block_sparse_attention(
            qb,
            kb,
            vb,
            selection.mask().to(torch.int8),
            [BLOCK_SIZE, BLOCK_SIZE],
            q_input_layout="BNSD",
            kv_input_layout="BNSD",
            num_key_value_heads=k.shape[2],
            scale_value=scale,
            inner_precise=_inner_precise(torch_npu),
            actual_seq_lengths=[seq] * batch,
            actual_seq_lengths_kv=[seq] * batch,
            softmax_lse_flag=0,
        )
        return out.transpose(1, 2)

    @staticmethod
    def _attentions_kernel(q, k, v, selection, scale):
        from attnbridge.platforms.npu import load_attentions_ops

        ops = load_attentions_ops("rain_fusion")
        heads, seq = q.shape[2], q.shape[1]
        groups = heads // k.shape[2]
        if groups > 1:  # the kernel takes one head count: give K/V the query heads
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        width = selection.indices.shape[-1]
        listed = torch.arange(width, device=q.device) < selection.counts[..., None]
        # [B, N, nq, nk] -> per batch [nq, N, nk], ascending kept blocks then -1, as int64.
        select_idx = torch.where(listed, selection.indices.long(), -1).transpose(1, 2)
        select_num = selection.counts.long().transpose(1, 2)
        outs = []
        for b in range(q.shape[0]):
            out, _ = ops.rainfusionattention(
                q[b].contiguous(),
                k[b].contiguous(),
                v[b].contiguous(),
                select_idx=select_idx[b].contiguous(),
                select_num_idx=select_num[b].contiguous(),
                blockshape=[BLOCK_SIZE, BLOCK_SIZE],
                actual_seq_qlen=[seq],
                actual_seq_kvlen=[seq],
                q_input_layout="TND",
                kv_input_layout="TND",
                head_num=heads,
                mask_type=0,
                scale=scale,
                inner_precise=0,
                block_size=0,
            )
            outs.append(out)
        return torch.stack(outs)
