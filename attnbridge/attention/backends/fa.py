"""The ``fa`` backend: dense attention that can also return the softmax LSE (ring attention needs it).

* CPU: :class:`ReferenceFAImpl`, float32 math in query chunks (exact, memory-bounded).
* CUDA / MUSA: :class:`AtenFAImpl`, torch SDPA's fused kernels called through their aten ops, which
  return the LSE; cuDNN first (the fastest on Hopper), then flash, then mem-efficient.
* Ascend: :class:`NpuFIAImpl`, ``torch_npu.npu_fused_infer_attention_score`` with ``softmax_lse_flag``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from attnbridge.attention.backends.masks import bottom_right_causal_mask, npu_compressed_causal_mask
from attnbridge.attention.contract import HALF_DTYPES, AttentionImpl, default_scale

logger = logging.getLogger("attnbridge")

#: Bytes of float32 scores one reference chunk may hold.
_REFERENCE_CHUNK_BYTES = 256 * 1024 * 1024


def reference_attention(q, k, v, *, causal: bool, scale: float, return_lse: bool):
    """Exact attention in float32 on BSHD tensors, chunked over queries to bound memory."""
    batch, s_q, heads, _ = q.shape
    s_kv, kv_heads = k.shape[1], k.shape[2]
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    chunk = max(1, _REFERENCE_CHUNK_BYTES // (4 * batch * heads * max(s_kv, 1)))
    outs, lses = [], []
    for start in range(0, s_q, chunk):
        scores = torch.matmul(qf[:, :, start : start + chunk], kf.transpose(-1, -2)) * scale
        if causal:
            visible = bottom_right_causal_mask(s_q, s_kv, q.device)[start : start + chunk]
            scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        # Rows that see no key (possible only with causal and s_q > s_kv) give 0, not NaN.
        probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
        outs.append(torch.matmul(probs, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


class ReferenceFAImpl(AttentionImpl):
    """Exact float32 attention on the CPU; slow but the ground truth other kernels are held to."""

    kernel = "float32 reference (chunked matmul + logsumexp)"

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        return reference_attention(
            q, k, v, causal=causal, scale=default_scale(q.shape[-1], scale), return_lse=return_lse
        )


def _expand_kv_heads(q, k, v):
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _lse_bhs(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """LSE as [B, H, S_q] float32; the mem-efficient kernel pads its S to a multiple of 32."""
    batch, heads, s_q = q.shape[0], q.shape[1], q.shape[2]
    return lse.reshape(batch, heads, -1)[..., :s_q].float()


def _cudnn(q, k, v, causal, scale):
    k, v = _expand_kv_heads(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )[:2]
    return out, lse


def _flash(q, k, v, causal, scale):
    k, v = _expand_kv_heads(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[
        :2
    ]
    return out, lse


def _efficient(q, k, v, causal, scale):
    k, v = _expand_kv_heads(q, k, v)
    batch, heads, s_q, s_kv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    bias, is_causal = None, causal and s_q == s_kv  # equal lengths: top-left == bottom-right
    if causal and s_q != s_kv:
        # The raw aten op needs the bias rows 16-element aligned (the public SDPA pads for us):
        # keep a padded buffer and pass a view of its first s_kv columns.
        padded = -(-s_kv // 16) * 16
        storage = torch.zeros(s_q, padded, dtype=q.dtype, device=q.device)
        visible = bottom_right_causal_mask(s_q, s_kv, q.device)
        storage[:, :s_kv].masked_fill_(~visible, float("-inf"))
        bias = storage[:, :s_kv].expand(batch, heads, -1, -1)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, is_causal, scale=scale
    )[:2]
    return out, lse


class AtenFAImpl(AttentionImpl):
    """Fused SDPA kernels through their aten ops, which also return the LSE.

    Without an LSE request the public SDPA call is used with cuDNN ranked first. With one, the first
    kernel that accepts the input wins: cuDNN (half dtypes, top-left causal so only S_q == S_kv),
    flash (same), then mem-efficient (any dtype, bottom-right causal through a bias); if none does,
    the exact float32 reference, with a warning logged once per kind of input.
    """

    kernel = "cuDNN / flash / mem-efficient SDPA (aten ops, with LSE)"

    def __init__(self, backend_name: str = "", **config) -> None:
        super().__init__(backend_name, **config)
        self._failed: set[tuple] = set()
        self._warned: set[tuple] = set()

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        scale = default_scale(q.shape[-1], scale)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if not return_lse:
            return self._forward_public(qt, kt, vt, causal, scale).transpose(1, 2)
        candidates = [_efficient]
        if q.dtype in HALF_DTYPES and (not causal or q.shape[1] == k.shape[1]):
            candidates = [_cudnn, _flash, _efficient]
        # A kernel that refused an input is not retried for inputs of the same kind (shapes, dtype,
        # causal, GQA, device); out-of-memory is not a refusal and propagates.
        kind = (q.shape, k.shape, q.dtype, causal, q.device)
        for kernel in candidates:
            key = (kernel.__name__, *kind)
            if key in self._failed:
                continue
            try:
                out, lse = kernel(qt, kt, vt, causal, scale)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                logger.info("fa: %s kernel rejected this input (%s); trying the next", kernel.__name__, error)
                self._failed.add(key)
                continue
            return out.transpose(1, 2), _lse_bhs(lse, qt)
        key = kind
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "fa: no fused SDPA kernel accepts %s head_dim %d (causal=%s) with an LSE; "
                "using the exact float32 reference kernel (slow)",
                q.dtype,
                q.shape[-1],
                causal,
            )
        return reference_attention(q, k, v, causal=causal, scale=scale, return_lse=True)

    @staticmethod
    def _forward_public(qt, kt, vt, causal, scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mask, is_causal = None, causal
        if causal and qt.shape[2] != kt.shape[2]:
            mask, is_causal = bottom_right_causal_mask(qt.shape[2], kt.shape[2], qt.device), False
        order = [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(
                qt,
                kt,
                vt,
                attn_mask=mask,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=qt.shape[1] != kt.shape[1],
            )


class NpuFIAImpl(AttentionImpl):
    """Ascend ``npu_fused_infer_attention_score`` (BSND in and out); LSE via ``softmax_lse_flag``."""

    kernel = "torch_npu.npu_fused_infer_attention_score (BSND, softmax_lse_flag)"
    # The documented FIA kernel takes float16/bfloat16 only: float32 is refused by name, not cast.
    supported_dtypes = HALF_DTYPES

    @classmethod
    def check_available(cls, platform: str) -> None:
        from attnbridge.platforms.npu import load_torch_npu

        load_torch_npu("fa")

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        from attnbridge.platforms.npu import load_torch_npu

        torch_npu = load_torch_npu("fa")
        extra = {}
        if causal:
            extra = {"atten_mask": npu_compressed_causal_mask(q.device), "sparse_mode": 3}
        out, lse = torch_npu.npu_fused_infer_attention_score(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            num_heads=q.shape[2],
            num_key_value_heads=k.shape[2],
            input_layout="BSND",
            scale=default_scale(q.shape[-1], scale),
            softmax_lse_flag=return_lse,
            **extra,
        )
        if not return_lse:
            return out
        # Documented LSE layout for BSND input: [B, N, S, 1].
        return out, lse.reshape(q.shape[0], q.shape[2], q.shape[1]).float()
