"""The ``laser`` backend: Ascend's Laser Attention kernel (dense), and its contract off Ascend.

Laser Attention (``torch.ops.attentions.la`` from sgl-kernel-npu, schema ``la(query, key, value,
atten_mask=None, alibi_mask=None, drop_mask=None, scale_value=1.0, head_num=2, input_layout='BNSD',
keep_prob=1.0, pre_tokens=2147483647, next_tokens=1, is_highPrecision=True) -> (softmax_stats,
out)``) only takes fp16 BNSD with the sequence a multiple of 256 and head_dim 128. So each call:

1. goes to the dense ``fa`` kernel instead when it is cross-attention (``S_q != S_kv`` or
   ``context.kind == "cross"``), shorter than 2048 tokens (the kernel misbehaves there), causal,
   asks for the LSE, or has head_dim > 128;
2. otherwise is cast to fp16 and zero-padded: sequence to a multiple of 256, head_dim to 128 (K/V
   heads repeated to the query heads: the kernel takes one head count). bf16 input is first scaled
   by 1/256 so values past fp16's 65504 stay finite (sglang's ``preserve_bf16_range``); the softmax
   scale passed is then ``scale * 256 * 256`` and the output is multiplied by 256;
3. passes ``pre_tokens = roundup(S_kv, 256) - S_kv`` (the zero-padded key rows) when padding was
   needed, else 2**31 - 1, and ``next_tokens=1``; we read that as "the last ``pre_tokens`` keys get
   no weight" and "no mask", as sglang's and sgl-kernel-npu's callers use them (not confirmed from
   the kernel source);
4. slices the (float32) output back to ``[:S_q, :D]`` and casts to the input dtype.

:class:`LaserReferenceImpl` (CPU, CUDA) runs steps 1-4 with the platform's dense ``fa`` kernel in
place of ``la``, so the contract is exercised where no Ascend device is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnbridge.attention.backends.sparse_common import dense_fa_impl
from attnbridge.attention.contract import HALF_DTYPES, AttentionImpl, default_scale
from attnbridge.errors import BackendUnavailableError

LASER_SEQ_ALIGN = 256
LASER_DIM_ALIGN = 128
#: Below this many tokens the Laser kernel is not used (it has issues with short sequences).
LASER_MIN_SEQ = 2048
#: ``pre_tokens`` meaning "no padded keys".
LASER_NO_PAD = 2**31 - 1
#: ``next_tokens`` as sglang passes it (the schema default); the emulation accepts only this value.
LASER_NEXT_TOKENS = 1
#: bf16 q, k, v are divided by this before the fp16 cast (bf16 reaches 3.4e38, fp16 only 65504).
BF16_RANGE_SHIFT = 256.0


@dataclass(frozen=True)
class LaserInputs:
    """q, k, v as the kernel takes them (fp16 BNSD, padded) and what undoes the padding."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    pre_tokens: int
    #: What q, k, v were divided by before the fp16 cast (256 for bf16, else 1); the output is
    #: multiplied back by it.
    range_shift: float
    #: The softmax scale to pass the kernel: the caller's, times ``range_shift**2`` for q and k.
    scale_value: float
    seq_len: int
    head_dim: int
    dtype: torch.dtype


def uses_laser_kernel(q, k, *, causal: bool, return_lse: bool, context) -> bool:
    """Whether a call goes to the Laser kernel (else to dense ``fa``)."""
    if causal or return_lse or q.shape[-1] > LASER_DIM_ALIGN:
        return False
    if context is not None and context.kind == "cross":
        return False
    return q.shape[1] == k.shape[1] and q.shape[1] >= LASER_MIN_SEQ


def laser_pre_tokens(seq_kv: int) -> int:
    """How many zero-padded key rows the kernel must ignore (2**31 - 1 when none were added)."""
    pad = -seq_kv % LASER_SEQ_ALIGN
    return pad if pad else LASER_NO_PAD


def laser_preprocess(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> LaserInputs:
    """BSHD inputs -> fp16 BNSD padded to (256, 128), K/V heads repeated to the query heads.

    bf16 input is divided by 256 first so that it fits fp16 (``range_shift``, ``scale_value``).
    """
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    seq_pad = -q.shape[1] % LASER_SEQ_ALIGN
    dim_pad = -q.shape[3] % LASER_DIM_ALIGN
    shift = BF16_RANGE_SHIFT if q.dtype == torch.bfloat16 else 1.0

    def prepare(x: torch.Tensor) -> torch.Tensor:
        if shift != 1.0:
            x = x / shift  # exact in bf16: a power of two
        x = torch.nn.functional.pad(x.to(torch.float16), (0, dim_pad, 0, 0, 0, seq_pad))
        return x.transpose(1, 2).contiguous()

    return LaserInputs(
        query=prepare(q),
        key=prepare(k),
        value=prepare(v),
        pre_tokens=laser_pre_tokens(k.shape[1]),
        range_shift=shift,
        scale_value=scale * shift * shift,
        seq_len=q.shape[1],
        head_dim=q.shape[3],
        dtype=q.dtype,
    )


def laser_postprocess(out: torch.Tensor, inputs: LaserInputs) -> torch.Tensor:
    """Kernel output BNSD (padded) -> BSHD ``[:S, :D]`` in the input dtype.

    fp16 and float32 input is rounded through fp16, the precision the kernel works in; bf16 output
    is multiplied back by 256 in float32 (in fp16 that could overflow).
    """
    out = out[:, :, : inputs.seq_len, : inputs.head_dim]
    if inputs.range_shift != 1.0:
        out = out.float() * inputs.range_shift
    else:
        out = out.to(torch.float16)
    return out.to(inputs.dtype).transpose(1, 2)


class LaserReferenceImpl(AttentionImpl):
    """The Laser contract on the dense ``fa`` kernel: same fallbacks, fp16 cast (bf16 range shift
    included), padding, pre_tokens."""

    kernel = "Laser contract (fp16, pad to 256/128, pre_tokens) on the dense fa kernel"

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        dense = dense_fa_impl(q.device)
        if not uses_laser_kernel(q, k, causal=causal, return_lse=return_lse, context=context):
            return dense.forward(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        inputs = laser_preprocess(q, k, v, default_scale(q.shape[-1], scale))
        visible = inputs.key.shape[2]
        if inputs.pre_tokens < visible:
            visible -= inputs.pre_tokens
        out = dense.forward(
            inputs.query.transpose(1, 2),
            inputs.key[:, :, :visible].transpose(1, 2),
            inputs.value[:, :, :visible].transpose(1, 2),
            scale=inputs.scale_value,
        )
        return laser_postprocess(out.transpose(1, 2), inputs)


def _check_not_a5(backend: str) -> None:
    from attnbridge.platforms.npu import is_ascend_a5, load_torch_npu

    torch_npu = load_torch_npu(backend)
    if is_ascend_a5(torch_npu):
        raise BackendUnavailableError(
            backend,
            "npu",
            "Laser Attention is unavailable on Ascend 950 (A5); use backend 'fa' or 'rain_fusion'",
        )


class NpuLaserImpl(AttentionImpl):
    """``torch.ops.attentions.la`` on fp16 BNSD padded input; dense FIA for the calls it cannot take."""

    kernel = "torch.ops.attentions.la (Laser Attention, fp16 BNSD padded to 256/128)"
    #: The kernel computes in fp16 and its dense fallback (FIA) takes only half dtypes.
    supported_dtypes = HALF_DTYPES

    @classmethod
    def check_available(cls, platform: str) -> None:
        from attnbridge.platforms.npu import load_attentions_ops

        load_attentions_ops("laser")
        _check_not_a5("laser")

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        from attnbridge.platforms.npu import load_attentions_ops

        if not uses_laser_kernel(q, k, causal=causal, return_lse=return_lse, context=context):
            dense = dense_fa_impl(q.device, npu=True)
            return dense.forward(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        ops = load_attentions_ops("laser")
        inputs = laser_preprocess(q, k, v, default_scale(q.shape[-1], scale))
        _, out = ops.la(
            inputs.query,
            inputs.key,
            inputs.value,
            atten_mask=None,
            alibi_mask=None,
            drop_mask=None,
            scale_value=inputs.scale_value,
            head_num=q.shape[2],
            input_layout="BNSD",
            keep_prob=1.0,
            pre_tokens=inputs.pre_tokens,
            next_tokens=LASER_NEXT_TOKENS,
            is_highPrecision=True,
        )
        return laser_postprocess(out, inputs)
