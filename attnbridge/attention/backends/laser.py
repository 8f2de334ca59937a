"""The ``laser`` backend: Ascend's Laser Attention kernel (dense), and its contract off Ascend.

Laser Attention (sgl-kernel-npu: ``torch.ops.npu.laser_attn`` in newer builds, ``torch.ops.attentions.la``
in older ones; schema ``(query, key, value, atten_mask=None, alibi_mask=None, drop_mask=None,
scale_value=1.0, head_num=2, input_layout='BNSD', keep_prob=1.0, pre_tokens=2147483647,
next_tokens=1, is_highPrecision=True) -> (softmax_stats, out)``) takes fp16 BNSD with the sequence
a multiple of 256 and head_dim 128 (its kernel instantiates only ``half``). So each call:

1. goes to the dense ``fa`` kernel instead when it is cross-attention (``S_q != S_kv`` or
   ``context.kind == "cross"``), shorter than 2048 tokens (the kernel misbehaves there), causal,
   asks for the LSE, has key padding, has head_dim > 128, or its softmax scale cannot be stored in
   fp16 (step 2);
2. otherwise is cast to fp16 and zero-padded: sequence to a multiple of 256, head_dim to 128 (K/V
   heads repeated to the query heads). bf16 input is first divided by a power of two ``s <= 256``
   so values past fp16's 65504 stay finite (sglang's ``preserve_bf16_range``); the kernel's scale is
   then ``scale * s * s``, which it applies in fp16, so ``s`` is the largest with
   ``scale * s * s <= 65504``; the output is multiplied back by ``s``;
3. passes ``pre_tokens = roundup(S_kv, 256) - S_kv`` (the zero-padded key rows) when padding was
   needed, else 2**31 - 1, and ``next_tokens=1``. The kernel masks exactly the last ``pre_tokens``
   key columns of the 256-aligned tail and never reads ``next_tokens`` (sgl-kernel-npu
   ``laser_attention_tiling.cpp`` reads only ``pre_tokens``; ``VectorForward.h`` fills those
   columns with -60000);
4. slices the (float32) output back to ``[:S_q, :D]`` and casts to the input dtype.

:class:`LaserReferenceImpl` (CPU, CUDA) runs steps 1-4 with the platform's dense ``fa`` kernel in
place of the kernel, so the contract is exercised where no Ascend device is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnbridge.attention.contract import HALF_DTYPES, AttentionImpl, default_scale, repeat_kv_heads
from attnbridge.attention.registry import Backend, Unavailable, make_impl
from attnbridge.errors import BackendUnavailableError
from attnbridge.platforms.npu import (
    SGL_KERNEL_NPU_INSTALL,
    TORCH_NPU_INSTALL,
    is_ascend_a5,
    load_kernel_op,
    load_torch_npu,
)

LASER_SEQ_ALIGN = 256
LASER_DIM_ALIGN = 128
#: Below this many tokens the Laser kernel is not used (it has issues with short sequences).
LASER_MIN_SEQ = 2048
#: ``pre_tokens`` meaning "no padded keys".
LASER_NO_PAD = 2**31 - 1
#: ``next_tokens`` as sglang passes it (the schema default; the kernel does not read it).
LASER_NEXT_TOKENS = 1
#: The largest bf16 range shift (bf16 reaches 3.4e38, fp16 only 65504).
BF16_RANGE_SHIFT = 256.0
#: The kernel holds its softmax scale in fp16.
FP16_MAX = 65504.0
#: Names of the kernel, per torch.ops namespace (newest layout first).
LASER_OPS = {"npu": ("laser_attn",), "attentions": ("la",)}


@dataclass(frozen=True)
class LaserInputs:
    """q, k, v as the kernel takes them (fp16 BNSD, padded) and what undoes the padding."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    pre_tokens: int
    #: What q, k, v were divided by before the fp16 cast; the output is multiplied back by it.
    range_shift: float
    #: The softmax scale to pass the kernel: the caller's, times ``range_shift**2`` for q and k.
    scale_value: float
    seq_len: int
    head_dim: int
    dtype: torch.dtype


def range_shift(dtype: torch.dtype, scale: float) -> float | None:
    """The power of two bf16 input is divided by (1 for fp16), or None when no shift lets the
    kernel's scale ``scale * shift**2`` fit fp16."""
    shift = BF16_RANGE_SHIFT if dtype == torch.bfloat16 else 1.0
    while shift > 1.0 and scale * shift * shift > FP16_MAX:
        shift /= 2.0
    return shift if scale * shift * shift <= FP16_MAX else None


def uses_laser_kernel(q, k, *, causal: bool, return_lse: bool, scale: float, context) -> bool:
    """Whether a call goes to the Laser kernel (else to dense ``fa``)."""
    if causal or return_lse or q.shape[-1] > LASER_DIM_ALIGN or range_shift(q.dtype, scale) is None:
        return False
    if context is not None and (context.kind == "cross" or context.key_lengths is not None):
        return False
    return q.shape[1] == k.shape[1] and q.shape[1] >= LASER_MIN_SEQ


def laser_pre_tokens(seq_kv: int) -> int:
    """How many zero-padded key rows the kernel must ignore (2**31 - 1 when none were added)."""
    pad = -seq_kv % LASER_SEQ_ALIGN
    return pad if pad else LASER_NO_PAD


def laser_preprocess(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> LaserInputs:
    """BSHD inputs -> fp16 BNSD padded to (256, 128), K/V heads repeated to the query heads."""
    k, v = repeat_kv_heads(q, k, v)
    seq_pad = -q.shape[1] % LASER_SEQ_ALIGN
    dim_pad = -q.shape[3] % LASER_DIM_ALIGN
    shift = range_shift(q.dtype, scale)

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

    fp16 and float32 input is rounded through fp16, the precision the kernel works in; shifted bf16
    output is multiplied back in float32 (in fp16 that could overflow).
    """
    out = out[:, :, : inputs.seq_len, : inputs.head_dim]
    if inputs.range_shift != 1.0:
        out = out.float() * inputs.range_shift
    else:
        out = out.to(torch.float16)
    return out.to(inputs.dtype).transpose(1, 2)


class LaserImplBase(AttentionImpl):
    """Steps 1-4 around :meth:`run_kernel`; the dense calls go to the platform's ``fa``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._dense = make_impl("fa", self.platform)

    def check_inputs(self, q, k, v, *, causal, return_lse):
        super().check_inputs(q, k, v, causal=causal, return_lse=return_lse)
        self._dense.check_inputs(q, k, v, causal=causal, return_lse=return_lse)

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        scale = default_scale(q.shape[-1], scale)
        if not uses_laser_kernel(q, k, causal=causal, return_lse=return_lse, scale=scale, context=context):
            return self._dense.forward(
                q, k, v, causal=causal, scale=scale, return_lse=return_lse, context=context
            )
        inputs = laser_preprocess(q, k, v, scale)
        return laser_postprocess(self.run_kernel(inputs), inputs)

    def run_kernel(self, inputs: LaserInputs) -> torch.Tensor:
        raise NotImplementedError


class LaserReferenceImpl(LaserImplBase):
    """The Laser contract on the dense ``fa`` kernel: same fallbacks, fp16 cast (bf16 range shift
    included), padding, pre_tokens."""

    description = "Laser contract (fp16, pad to 256/128, pre_tokens) on the dense fa kernel"
    notes = "the Laser contract on the dense `fa` kernel (same fallbacks, fp16 cast, padding)"

    def run_kernel(self, inputs: LaserInputs) -> torch.Tensor:
        visible = inputs.key.shape[2]
        if inputs.pre_tokens < visible:
            visible -= inputs.pre_tokens
        out = self._dense.forward(
            inputs.query.transpose(1, 2),
            inputs.key[:, :, :visible].transpose(1, 2),
            inputs.value[:, :, :visible].transpose(1, 2),
            scale=inputs.scale_value,
        )
        return out.transpose(1, 2)


class NpuLaserImpl(LaserImplBase):
    """sgl-kernel-npu's Laser Attention on fp16 BNSD padded input; dense FIA for the calls it cannot take."""

    description = "sgl-kernel-npu Laser Attention (laser_attn / la; fp16 BNSD padded to 256/128)"
    #: The kernel computes in fp16 and its dense fallback (FIA) takes only half dtypes.
    supported_dtypes = HALF_DTYPES
    install = (TORCH_NPU_INSTALL, SGL_KERNEL_NPU_INSTALL)
    notes = (
        "unavailable on Ascend 950 (A5); calls that are causal, cross, padded, ask for the LSE, have "
        "head_dim > 128, fewer than 2048 tokens or a scale fp16 cannot hold run dense FIA"
    )

    @classmethod
    def check_available(cls, platform: str) -> None:
        load_kernel_op("laser", LASER_OPS)
        if is_ascend_a5(load_torch_npu("laser")):
            raise BackendUnavailableError(
                "laser",
                "npu",
                "Laser Attention is unavailable on Ascend 950 (A5); use backend 'fa' or 'rain_fusion'",
            )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._op = load_kernel_op("laser", LASER_OPS)

    def run_kernel(self, inputs: LaserInputs) -> torch.Tensor:
        _, out = self._op(
            inputs.query,
            inputs.key,
            inputs.value,
            atten_mask=None,
            alibi_mask=None,
            drop_mask=None,
            scale_value=inputs.scale_value,
            head_num=inputs.query.shape[1],
            input_layout="BNSD",
            keep_prob=1.0,
            pre_tokens=inputs.pre_tokens,
            next_tokens=LASER_NEXT_TOKENS,
            is_highPrecision=True,
        )
        return out


BACKEND = Backend(
    "laser",
    "Ascend Laser Attention (BNSD, padded to 256); fa elsewhere",
    platforms={
        "cpu": LaserReferenceImpl,
        "cuda": LaserReferenceImpl,
        "musa": Unavailable("Laser Attention is an Ascend NPU kernel; use 'fa'"),
        "npu": NpuLaserImpl,
    },
    order=3,
)
