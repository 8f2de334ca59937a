"""The ``laser`` backend: Ascend's Laser Attention kernel (dense), and its contract off Ascend.

The kernel (sgl-kernel-npu ``torch.ops.npu.laser_attn``, older ``torch.ops.attentions.la``) takes only
fp16 BNSD, so q, k, v are cast, zero-padded to a multiple of 256 tokens and head_dim 128 (K/V heads
repeated); bf16 is first divided by a power of two ``s <= 256`` to stay finite in fp16, with the scale
``scale * s * s`` and the output multiplied back by ``s``. ``pre_tokens`` masks exactly the zero-padded
tail keys and the kernel never reads ``next_tokens`` (sgl-kernel-npu ``VectorForward.h``,
``laser_attention_tiling.cpp``); key padding goes to the kernel one sample at a time where it fits that
256-key tail. Cross-attention, fewer than 2048 tokens (the kernel misbehaves there), causal calls, LSE
requests, head_dim > 128 and a scale fp16 cannot hold run dense ``fa``. On CPU and CUDA the same
contract runs on the platform's dense ``fa`` kernel. Arguments and sources: ``docs/ascend.md``.
"""

from __future__ import annotations

import dataclasses

import torch

from attnbridge.attention.contract import HALF_DTYPES, default_scale, repeat_kv_heads
from attnbridge.attention.registry import Backend, DenseFallbackImpl, Unavailable
from attnbridge.errors import BackendUnavailableError
from attnbridge.notices import warn_once
from attnbridge.platforms.npu import (
    SGL_KERNEL_NPU_INSTALL,
    TORCH_NPU_INSTALL,
    is_ascend_a5,
    load_kernel_op,
    load_torch_npu,
)

LASER_SEQ_ALIGN = 256
LASER_DIM_ALIGN = 128
#: Below this many tokens the Laser kernel is not used (it misbehaves on short sequences).
LASER_MIN_SEQ = 2048
#: The largest bf16 range shift (bf16 reaches 3.4e38, fp16 only 65504).
BF16_RANGE_SHIFT = 256.0
#: The kernel holds its softmax scale in fp16.
FP16_MAX = 65504.0
#: Names of the kernel, per torch.ops namespace (newest layout first).
LASER_OPS = {"npu": ("laser_attn",), "attentions": ("la",)}


def range_shift(dtype: torch.dtype, scale: float) -> float | None:
    """The power of two bf16 input is divided by (fp16: 1); None if no ``scale * shift**2`` fits fp16."""
    shift = BF16_RANGE_SHIFT if dtype == torch.bfloat16 else 1.0
    while shift > 1.0 and scale * shift * shift > FP16_MAX:
        shift /= 2.0
    return shift if scale * shift * shift <= FP16_MAX else None


def uses_laser_kernel(q, k, *, causal: bool, return_lse: bool, scale: float, context) -> bool:
    """Whether a call goes to the Laser kernel (else to dense ``fa``)."""
    if causal or return_lse or q.shape[-1] > LASER_DIM_ALIGN or range_shift(q.dtype, scale) is None:
        return False
    if context is not None and context.kind == "cross":
        return False
    return q.shape[1] == k.shape[1] and q.shape[1] >= LASER_MIN_SEQ


class LaserImplBase(DenseFallbackImpl):
    """The contract around :meth:`run_kernel`; the calls it cannot take go to the platform's ``fa``."""

    def serves_text_tail(self, context) -> bool:
        return False  # its kernel wants S_q == S_kv: the text queries past the keys take a dense call

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        scale = default_scale(q.shape[-1], scale)
        if range_shift(q.dtype, scale) is None:
            warn_once(
                f"backend 'laser': softmax scale {scale:g} does not fit the kernel's float16 scale "
                f"(scale x shift^2 <= {FP16_MAX:g}) whatever the range shift; such calls run dense 'fa'"
            )
        key_lengths = None if context is None else context.key_lengths
        dense = not uses_laser_kernel(
            q, k, causal=causal, return_lse=return_lse, scale=scale, context=context
        )
        if dense or (key_lengths is not None and self.padding_fallback):
            return self.dense(q, k, v, causal=causal, scale=scale, return_lse=return_lse, context=context)
        padded_seq, outs = q.shape[1] + -q.shape[1] % LASER_SEQ_ALIGN, []
        if key_lengths is None:
            return self._laser(q, k, v, scale, q.shape[1], padded_seq)
        for b, valid in enumerate(key_lengths.tolist()):  # host-side: pre_tokens is a host integer
            if not 0 <= valid <= k.shape[1]:
                raise ValueError(f"backend 'laser': key_lengths must lie in [0, {k.shape[1]}]; got {valid}")
            one = slice(b, b + 1)
            if padded_seq - valid < LASER_SEQ_ALIGN:
                outs.append(self._laser(q[one], k[one], v[one], scale, valid, padded_seq))
            else:  # more padded keys than the kernel's tail masks
                sample = dataclasses.replace(context, key_lengths=key_lengths[one])
                outs.append(self.dense(q[one], k[one], v[one], scale=scale, context=sample))
        return torch.cat(outs)

    def _laser(self, q, k, v, scale: float, valid: int, padded_seq: int) -> torch.Tensor:
        """The kernel over keys ``[:valid]``, the later ones zeroed and masked through ``pre_tokens``;
        ``padded_seq``: the sequence rounded up to 256."""
        k, v = repeat_kv_heads(q, k[:, :valid], v[:, :valid])
        shift, dim_pad = range_shift(q.dtype, scale), -q.shape[3] % LASER_DIM_ALIGN

        def prepare(x: torch.Tensor) -> torch.Tensor:  # BSHD -> fp16 BNSD padded to (256, 128)
            if shift != 1.0:
                x = x / shift  # exact in bf16: a power of two
            x = torch.nn.functional.pad(x.to(torch.float16), (0, dim_pad, 0, 0, 0, padded_seq - x.shape[1]))
            return x.transpose(1, 2).contiguous()

        pre_tokens = padded_seq - valid or 2**31 - 1  # 2**31 - 1: no padded keys
        out = self.run_kernel(prepare(q), prepare(k), prepare(v), pre_tokens, scale * shift * shift)
        out = out[:, :, : q.shape[1], : q.shape[3]]
        # Other input rounds through fp16 as in the kernel; shifted bf16 scales back in float32 (no overflow).
        out = out.float() * shift if shift != 1.0 else out.to(torch.float16)
        return out.to(q.dtype).transpose(1, 2)

    def run_kernel(self, query, key, value, pre_tokens: int, scale_value: float) -> torch.Tensor:
        """The kernel on fp16 BNSD padded q, k, v; returns the padded BNSD output."""
        raise NotImplementedError


class LaserReferenceImpl(LaserImplBase):
    """The Laser contract on the dense ``fa`` kernel: same fallbacks, fp16 cast (bf16 range shift
    included), padding, pre_tokens."""

    description = "Laser contract (fp16, pad to 256/128, pre_tokens) on the dense fa kernel"
    notes = "the Laser contract on the dense `fa` kernel (same fallbacks, fp16 cast, padding)"

    def run_kernel(self, query, key, value, pre_tokens: int, scale_value: float) -> torch.Tensor:
        visible = key.shape[2] - pre_tokens if pre_tokens < key.shape[2] else key.shape[2]
        out = self._dense.forward(
            query.transpose(1, 2),
            key[:, :, :visible].transpose(1, 2),
            value[:, :, :visible].transpose(1, 2),
            scale=scale_value,
        )
        return out.transpose(1, 2)


class LaserCudaReferenceImpl(LaserReferenceImpl):
    """The Laser contract on CUDA, where padded calls run dense ``fa`` (per-sample lengths would sync)."""

    padding_fallback = "the Laser contract reads key lengths on the host, which would sync on CUDA"


class NpuLaserImpl(LaserImplBase):
    """sgl-kernel-npu's Laser Attention on fp16 BNSD padded input; dense FIA for the calls it cannot take."""

    description = "sgl-kernel-npu Laser Attention (laser_attn / la; fp16 BNSD padded to 256/128)"
    #: The kernel computes in fp16 and its dense fallback (FIA) takes only half dtypes.
    supported_dtypes = HALF_DTYPES
    install = (TORCH_NPU_INSTALL, SGL_KERNEL_NPU_INSTALL)
    notes = (
        "unavailable on Ascend 950 (A5); calls that are causal, cross, ask for the LSE, have head_dim > "
        "128, fewer than 2048 tokens or a scale fp16 cannot hold run dense FIA, as do samples with more "
        "padded keys than the 256-key tail"
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

    def run_kernel(self, query, key, value, pre_tokens: int, scale_value: float) -> torch.Tensor:
        _, out = self._op(
            query,
            key,
            value,
            atten_mask=None,
            alibi_mask=None,
            drop_mask=None,
            scale_value=scale_value,
            head_num=query.shape[1],
            input_layout="BNSD",
            keep_prob=1.0,
            pre_tokens=pre_tokens,
            next_tokens=1,  # as sglang passes it (the schema default; the kernel does not read it)
            is_highPrecision=True,
        )
        return out


BACKEND = Backend(
    "laser",
    "Ascend Laser Attention (BNSD, padded to 256); fa elsewhere",
    platforms={
        "cpu": LaserReferenceImpl,
        "cuda": LaserCudaReferenceImpl,
        "musa": Unavailable("Laser Attention is an Ascend NPU kernel; use 'fa'"),
        "npu": NpuLaserImpl,
    },
    order=3,
)
