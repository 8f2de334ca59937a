"""The ``fa`` backend: dense attention that can also return the softmax LSE (ring attention needs it).

* CPU: :class:`ReferenceFAImpl`, float32 math in query chunks (exact, memory-bounded).
* CUDA / MUSA: :class:`AtenFAImpl`, torch SDPA's fused kernels called through their aten ops, which
  return the LSE; cuDNN first (the fastest on Hopper), then flash, then mem-efficient.
* Ascend: :class:`NpuFIAImpl`, ``torch_npu.npu_fused_infer_attention_score`` with ``softmax_lse_flag``.

Every path carries key padding (``context.key_lengths``) and propagates NaN and inf as torch SDPA does.
"""

from __future__ import annotations

import logging

import torch

from attnbridge.attention.contract import HALF_DTYPES, AttentionImpl, default_scale, repeat_kv_heads
from attnbridge.attention.masks import bottom_right_causal_mask, key_padding_mask, npu_compressed_causal_mask
from attnbridge.attention.registry import Backend
from attnbridge.platforms.npu import TORCH_NPU_INSTALL, load_torch_npu

logger = logging.getLogger("attnbridge")

#: Bytes of float32 scores one reference chunk may hold.
_REFERENCE_CHUNK_BYTES = 256 * 1024 * 1024


def reference_attention(q, k, v, *, causal: bool, scale: float, return_lse: bool, key_lengths=None):
    """Exact attention in float32 on BSHD tensors, chunked over queries to bound memory. A row that
    sees no key gives 0 and LSE -inf; NaN and inf propagate as in torch SDPA."""
    batch, s_q, heads, _ = q.shape
    s_kv = k.shape[1]
    qf = q.float().transpose(1, 2)
    kf, vf = repeat_kv_heads(q, k.float(), v.float())
    kf, vf = kf.transpose(1, 2), vf.transpose(1, 2)
    visible = bottom_right_causal_mask(s_q, s_kv, q.device) if causal else None
    if key_lengths is not None:
        padding = key_padding_mask(key_lengths, s_kv)
        visible = padding if visible is None else visible & padding
    chunk = max(1, _REFERENCE_CHUNK_BYTES // (4 * batch * heads * max(s_kv, 1)))
    outs, lses = [], []
    for start in range(0, s_q, chunk):
        scores = torch.matmul(qf[:, :, start : start + chunk], kf.transpose(-1, -2)) * scale
        if visible is not None:
            rows = visible if visible.shape[-2] == 1 else visible[..., start : start + chunk, :]
            scores = scores.masked_fill(~rows, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        probs = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, probs)  # rows with no key: 0
        outs.append(torch.matmul(probs, vf))
        lses.append(lse)
    if not outs:
        outs, lses = [qf.new_zeros(batch, heads, 0, q.shape[-1])], [qf.new_zeros(batch, heads, 0)]
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


class ReferenceFAImpl(AttentionImpl):
    """Exact float32 attention on the CPU; slow but the ground truth other kernels are held to."""

    description = "float32 reference (chunked matmul + logsumexp)"

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        return reference_attention(
            q,
            k,
            v,
            causal=causal,
            scale=default_scale(q.shape[-1], scale),
            return_lse=return_lse,
            key_lengths=None if context is None else context.key_lengths,
        )


def _bshd_result(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, return_lse: bool):
    """BHSD ``out`` as BSHD, with the LSE as float32 [B, H, S_q] (mem-efficient pads S to a multiple of 32)."""
    if not return_lse:
        return out.transpose(1, 2)
    return out.transpose(1, 2), lse.reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]].float()


def _padding_bias(q, key_lengths, s_kv, causal):
    """Additive bias ``[B, 1, S_q, S_kv]`` (0 visible, -inf not), rows 16-element aligned (the raw aten
    kernels need that); padding alone is one row per sample broadcast over the queries (stride 0)."""
    visible = key_padding_mask(key_lengths, s_kv) if key_lengths is not None else None
    if causal:
        tri = bottom_right_causal_mask(q.shape[2], s_kv, q.device)[None, None]
        visible = tri if visible is None else visible & tri
    rows = visible.shape[2]  # 1 for padding alone
    storage = torch.zeros(visible.shape[0], 1, rows, -(-s_kv // 16) * 16, dtype=q.dtype, device=q.device)
    storage[..., :s_kv].masked_fill_(~visible, float("-inf"))
    return storage[..., :s_kv].expand(-1, -1, q.shape[2], -1)


def _cudnn(q, k, v, causal, scale, lse, bias):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, bias, lse, 0.0, causal, False, scale=scale
    )
    return out[0], out[1]


def _flash(q, k, v, causal, scale, lse, bias):  # never given a bias (see AtenFAImpl._candidates)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _efficient(q, k, v, causal, scale, lse, bias):
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], -1, -1)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, lse, 0.0, causal, scale=scale)
    return out[0], out[1]


class AtenFAImpl(AttentionImpl):
    """Fused SDPA kernels through their aten ops, which also return the LSE.

    First taker wins: cuDNN (half dtypes; causal only with S_q == S_kv: its mask is top-left), flash
    (the same, no mask), mem-efficient (any dtype; bottom-right causal and padding as a bias), else the
    float32 reference, warned once per kind of input. Under ``torch.compile`` the choice follows the
    input's properties alone.
    """

    description = "cuDNN / flash / mem-efficient SDPA (aten ops, with LSE)"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._refused: set[tuple] = set()
        self._warned: set[tuple] = set()

    @staticmethod
    def _candidates(q, k, causal, masked):
        half = q.dtype in HALF_DTYPES and q.shape[-1] % 8 == 0
        aligned = not causal or q.shape[1] == k.shape[1]
        if not (half and aligned):
            return [_efficient]
        if masked:
            return [_cudnn, _efficient]
        return [_cudnn, _flash, _efficient] if q.shape[-1] <= 128 else [_flash, _efficient]

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        scale = default_scale(q.shape[-1], scale)
        key_lengths = None if context is None else context.key_lengths
        qt = q.transpose(1, 2)
        kt, vt = repeat_kv_heads(qt, k.transpose(1, 2), v.transpose(1, 2), head_dim=1)
        candidates = self._candidates(q, k, causal, key_lengths is not None)
        bias, kernel_causal = None, causal
        if key_lengths is not None or (causal and q.shape[1] != k.shape[1]):
            bias, kernel_causal = _padding_bias(qt, key_lengths, k.shape[1], causal), False
        if torch.compiler.is_compiling():
            kernel = _efficient if bias is not None else candidates[0]
            out, lse = kernel(qt, kt, vt, kernel_causal, scale, return_lse, bias)
            return _bshd_result(out, lse, qt, return_lse)
        # A refusing kernel is not retried for the same kind of input; out-of-memory propagates.
        kind = (q.shape, k.shape, q.dtype, causal, bias is not None, q.device)
        for kernel in candidates:
            key = (kernel.__name__, *kind)
            if key in self._refused:
                continue
            try:
                out, lse = kernel(qt, kt, vt, kernel_causal, scale, return_lse, bias)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                logger.info("fa: %s kernel rejected this input (%s); trying the next", kernel.__name__, error)
                self._refused.add(key)
                continue
            return _bshd_result(out, lse, qt, return_lse)
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(
                "fa: no fused SDPA kernel accepts %s head_dim %d (causal=%s); using the exact float32 "
                "reference kernel (slow)",
                q.dtype,
                q.shape[-1],
                causal,
            )
        return reference_attention(
            q, k, v, causal=causal, scale=scale, return_lse=return_lse, key_lengths=key_lengths
        )


#: FIA's documented limits (torch_npu ``_op_plugin_docs.py``, npu_fused_infer_attention_score).
FIA_HEAD_ALIGN = 16
FIA_MAX_HEAD_DIM = 512
FIA_MAX_HEAD_RATIO = 64
FIA_MAX_HEADS = 256
#: BSND (and BSH) only: query heads x head size must stay below this.
FIA_BSND_WIDTH_LIMIT = 65535
FIA_HEAD_SIZES = tuple(range(FIA_HEAD_ALIGN, FIA_MAX_HEAD_DIM + 1, FIA_HEAD_ALIGN))


def check_fia_limits(backend: str, q: torch.Tensor, k: torch.Tensor, layout: str = "BSND") -> None:
    """FIA's head-size, head-count and head-ratio limits (q, k BSND), as a ValueError naming the limit."""
    where = f"backend {backend!r} on Ascend (npu_fused_infer_attention_score)"
    head_dim = q.shape[-1]
    if head_dim % FIA_HEAD_ALIGN or head_dim > FIA_MAX_HEAD_DIM:
        raise ValueError(
            f"{where}: head size {head_dim} must be a multiple of {FIA_HEAD_ALIGN} and at most "
            f"{FIA_MAX_HEAD_DIM}"
        )
    if q.shape[2] > FIA_MAX_HEADS:
        raise ValueError(f"{where}: {q.shape[2]} query heads; FIA takes at most {FIA_MAX_HEADS}")
    if layout == "BSND" and q.shape[2] * head_dim >= FIA_BSND_WIDTH_LIMIT:
        raise ValueError(
            f"{where}: {q.shape[2]} query heads x head size {head_dim} must stay below "
            f"{FIA_BSND_WIDTH_LIMIT} in the BSND layout"
        )
    if q.shape[2] // k.shape[2] > FIA_MAX_HEAD_RATIO:
        raise ValueError(
            f"{where}: {q.shape[2]} query heads per {k.shape[2]} key/value heads is a ratio above "
            f"{FIA_MAX_HEAD_RATIO}"
        )


def fia(q, k, v, layout: str, scale: float, backend: str = "fa", **extra):
    """``torch_npu.npu_fused_infer_attention_score`` on ``layout`` (BSND or TND: heads are dim -2)."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    return load_torch_npu(backend).npu_fused_infer_attention_score(
        q,
        k,
        v,
        num_heads=q.shape[-2],
        num_key_value_heads=k.shape[-2],
        input_layout=layout,
        scale=scale,
        **extra,
    )


def npu_fia(q, k, v, *, causal: bool, scale: float, return_lse: bool, key_lengths=None, backend: str = "fa"):
    """``npu_fused_infer_attention_score`` on BSHD (BSND) tensors; LSE ``[B, N, S]`` float32. Padding goes
    in as ``actual_seq_lengths_kv``; causal + padded as an explicit ``[B, 1, S_q, S_kv]`` mask
    (``sparse_mode`` 3 would align the triangle to each sample's valid length)."""
    check_fia_limits(backend, q, k)
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(
            f"backend {backend!r} on Ascend: causal attention with more queries ({q.shape[1]}) than keys "
            f"({k.shape[1]}) leaves rows with no visible key, which FIA does not define"
        )
    extra = {}
    if causal and key_lengths is not None:
        visible = key_padding_mask(key_lengths, k.shape[1]) & bottom_right_causal_mask(
            q.shape[1], k.shape[1], q.device
        )
        extra = {"atten_mask": ~visible.contiguous()}  # True = masked
    elif causal:
        extra = {"atten_mask": npu_compressed_causal_mask(q.device), "sparse_mode": 3}
    elif key_lengths is not None:
        extra["actual_seq_lengths_kv"] = key_lengths.tolist()  # the op takes host-side lengths
    out, lse = fia(q, k, v, "BSND", scale, backend, softmax_lse_flag=return_lse, **extra)
    if not return_lse:
        return out
    # Documented LSE layout for BSND input: [B, N, S, 1].
    return out, lse.reshape(q.shape[0], q.shape[2], q.shape[1]).float()


class NpuFIAImpl(AttentionImpl):
    """Ascend ``npu_fused_infer_attention_score`` (BSND in and out); LSE via ``softmax_lse_flag``."""

    description = "torch_npu.npu_fused_infer_attention_score (BSND, softmax_lse_flag)"
    # The documented FIA kernel takes float16/bfloat16 only: float32 is refused by name, not cast.
    supported_dtypes = HALF_DTYPES
    # Declared, so that enable_npu_attention refuses a model whose head size FIA does not take.
    supported_head_sizes = FIA_HEAD_SIZES
    install = (TORCH_NPU_INSTALL,)
    notes = "at most 64 query heads per key/value head"

    @classmethod
    def check_available(cls, platform: str) -> None:
        load_torch_npu("fa")

    def check_inputs(self, q, k, v, *, causal, return_lse):
        super().check_inputs(q, k, v, causal=causal, return_lse=return_lse)
        check_fia_limits(self.backend, q, k)

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        return npu_fia(
            q,
            k,
            v,
            causal=causal,
            scale=default_scale(q.shape[-1], scale),
            return_lse=return_lse,
            key_lengths=None if context is None else context.key_lengths,
            backend=self.backend,
        )


BACKEND = Backend(
    "fa",
    "flash attention that can return the softmax LSE (for ring attention)",
    platforms={"cpu": ReferenceFAImpl, "cuda": AtenFAImpl, "musa": AtenFAImpl, "npu": NpuFIAImpl},
    order=1,
)
