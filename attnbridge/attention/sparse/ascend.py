"""The Ascend block-sparse kernels, fed attnbridge's own selection (same blocks on every platform).
Neither returns an LSE nor takes key padding here: those calls run dense FIA. The ops, their arguments
and the sources they follow: ``docs/ascend.md``.
"""

from __future__ import annotations

import torch

from attnbridge.attention.contract import HALF_DTYPES, repeat_kv_heads
from attnbridge.attention.sparse.impl import Kernel
from attnbridge.platforms.npu import (
    SGL_KERNEL_NPU_INSTALL,
    TORCH_NPU_INSTALL,
    is_ascend_a5,
    load_kernel_op,
    load_torch_npu,
)

#: The Ascend kernels' "no window" value for pre/next tokens (sglang's constant; not 2**31 - 1).
NPU_NO_WINDOW = 214748647
#: Names of the block-sparse kernel per torch.ops namespace, newest first.
BLOCK_SPARSE_OPS = {
    "npu": ("ada_block_sparse_attention",),
    "attentions": ("ada_block_sparse_attention", "block_sparse_attention"),
}
RAIN_FUSION_OPS = {"attentions": ("rainfusionattention",)}


def npu_sparse_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[B, N, nq, nk]`` -> the kernel's int8 mask ``[B, N, nq, align32(nk)]`` (zero padded)
    and int32 count table ``[B, N, nq]`` (kept blocks per row), as ``sparse_block_estimate`` makes."""
    nk = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.int8), (0, -nk % 32))
    return padded.contiguous(), mask.sum(dim=-1, dtype=torch.int32)


def _run_block_sparse(q, k, v, selection, scale, return_lse, layout, key_lengths=None):
    op = load_kernel_op("block_sparse", BLOCK_SPARSE_OPS)
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
        sparse_size=layout.block_size,
        num_heads=q.shape[2],
        num_key_value_heads=k.shape[2],
        scale_value=scale,
        causal=False,
        inner_precise=1,  # the kernel's only fp16 tiling keys are high-performance ones
        pre_tokens=NPU_NO_WINDOW,  # ignored: the kernel builds no band mask (passed as sglang does)
        next_tokens=NPU_NO_WINDOW,
    )
    return out.transpose(1, 2)


ASCEND_BLOCK_SPARSE = Kernel(
    "sgl-kernel-npu ada_block_sparse_attention (BNSD)",
    _run_block_sparse,
    supported_dtypes=HALF_DTYPES,
    supported_head_sizes=(32, 64, 96, 128),
    returns_lse=False,
    key_padding=False,
    install=(TORCH_NPU_INSTALL, SGL_KERNEL_NPU_INSTALL),
    check_available=lambda platform: load_kernel_op("block_sparse", BLOCK_SPARSE_OPS) and None,
    notes="LSE requests and padded batches run dense FIA (the kernel returns no LSE)",
)


def _torch_npu_block_sparse(torch_npu, q, k, v, selection, scale, block_size):
    batch, seq = q.shape[0], q.shape[1]
    k, v = repeat_kv_heads(q, k, v)  # the op's GQA head mapping is undocumented
    qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    out, _ = torch_npu.npu_block_sparse_attention(
        qb,
        kb,
        vb,
        selection.mask().to(torch.int8),
        [block_size, block_size],
        q_input_layout="BNSD",
        kv_input_layout="BNSD",
        num_key_value_heads=q.shape[2],
        scale_value=scale,
        # bf16 needs 0 (fp32 softmax) on Ascend A2/A3; Ascend 950 (A5) wants 4.
        inner_precise=4 if is_ascend_a5(torch_npu) else 0,
        actual_seq_lengths=[seq] * batch,
        actual_seq_lengths_kv=[seq] * batch,
        softmax_lse_flag=0,
    )
    return out.transpose(1, 2)


def _rainfusionattention(q, k, v, selection, scale, block_size):
    op = load_kernel_op("rain_fusion", RAIN_FUSION_OPS)
    heads, seq = q.shape[2], q.shape[1]
    k, v = repeat_kv_heads(q, k, v)  # the kernel's GQA is undocumented
    width = selection.indices.shape[-1]
    listed = torch.arange(width, device=q.device) < selection.counts[..., None]
    # [B, N, nq, nk] -> per batch [nq, N, nk], ascending kept blocks then -1, as int64.
    select_idx = torch.where(listed, selection.indices.long(), -1).transpose(1, 2)
    select_num = selection.counts.long().transpose(1, 2)
    outs = []
    for b in range(q.shape[0]):
        out, _ = op(
            q[b].contiguous(),
            k[b].contiguous(),
            v[b].contiguous(),
            select_idx=select_idx[b].contiguous(),
            select_num_idx=select_num[b].contiguous(),
            blockshape=[block_size, block_size],
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


def _run_rain_fusion(q, k, v, selection, scale, return_lse, layout, key_lengths=None):
    torch_npu = load_torch_npu("rain_fusion")
    if hasattr(torch_npu, "npu_block_sparse_attention"):
        return _torch_npu_block_sparse(torch_npu, q, k, v, selection, scale, layout.block_size)
    return _rainfusionattention(q, k, v, selection, scale, layout.block_size)


def _rain_fusion_available(platform: str) -> None:
    if not hasattr(load_torch_npu("rain_fusion"), "npu_block_sparse_attention"):
        load_kernel_op("rain_fusion", RAIN_FUSION_OPS)


ASCEND_RAIN_FUSION = Kernel(
    "torch_npu.npu_block_sparse_attention (or sgl-kernel-npu rainfusionattention)",
    _run_rain_fusion,
    supported_dtypes=HALF_DTYPES,
    supported_head_sizes=(64, 128),
    returns_lse=False,
    key_padding=False,
    install=(TORCH_NPU_INSTALL,),
    check_available=_rain_fusion_available,
    notes=(
        "LSE requests and padded batches run dense FIA; uses sgl-kernel-npu's `rainfusionattention` "
        "when torch_npu has no `npu_block_sparse_attention`"
    ),
)
