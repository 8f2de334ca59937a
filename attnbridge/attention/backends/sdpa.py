"""The ``sdpa`` backend: torch's scaled_dot_product_attention, and Ascend's npu_fusion_attention."""

from __future__ import annotations

import torch.nn.functional as F

from attnbridge.attention.backends.masks import bottom_right_causal_mask, npu_compressed_causal_mask
from attnbridge.attention.contract import AttentionImpl, default_scale


class TorchSDPAImpl(AttentionImpl):
    """torch SDPA; torch picks cuDNN/flash/mem-efficient/math for the device. No LSE."""

    kernel = "torch.nn.functional.scaled_dot_product_attention"
    supports_lse = False

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        s_q, s_kv = q.shape[1], k.shape[1]
        mask = None
        is_causal = causal
        if causal and s_q != s_kv:
            mask, is_causal = bottom_right_causal_mask(s_q, s_kv, q.device), False
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            scale=default_scale(q.shape[-1], scale),
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)


class NpuFusionAttentionImpl(AttentionImpl):
    """Ascend ``torch_npu.npu_fusion_attention`` in BSND layout (what torch SDPA lowers to on NPU)."""

    kernel = "torch_npu.npu_fusion_attention (BSND)"
    supports_lse = False

    @classmethod
    def check_available(cls, platform: str) -> None:
        from attnbridge.platforms.npu import load_torch_npu

        load_torch_npu("sdpa")

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        from attnbridge.platforms.npu import load_torch_npu

        torch_npu = load_torch_npu("sdpa")
        extra = {}
        if causal:
            extra = {"atten_mask": npu_compressed_causal_mask(q.device), "sparse_mode": 3}
        outputs = torch_npu.npu_fusion_attention(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            q.shape[2],
            "BSND",
            scale=default_scale(q.shape[-1], scale),
            keep_prob=1.0,
            **extra,
        )
        return outputs[0]
