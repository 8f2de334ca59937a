"""The ``sdpa`` backend: torch's scaled_dot_product_attention, and Ascend's npu_fusion_attention."""

from __future__ import annotations

import torch.nn.functional as F

from attnbridge.attention.contract import AttentionImpl, default_scale
from attnbridge.attention.masks import bottom_right_causal_mask, key_padding_mask, npu_compressed_causal_mask
from attnbridge.attention.registry import Backend
from attnbridge.platforms.npu import TORCH_NPU_INSTALL, load_torch_npu


class TorchSDPAImpl(AttentionImpl):
    """torch SDPA; torch picks cuDNN/flash/mem-efficient/math for the device. No LSE."""

    description = "torch.nn.functional.scaled_dot_product_attention"
    supports_lse = False

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        s_q, s_kv = q.shape[1], k.shape[1]
        padded = context is not None and context.key_lengths is not None
        mask, is_causal = None, causal
        if causal and (s_q != s_kv or padded):  # SDPA's is_causal aligns top-left and takes no mask
            mask, is_causal = bottom_right_causal_mask(s_q, s_kv, q.device), False
        if padded:
            padding = key_padding_mask(context.key_lengths, s_kv)
            mask = padding if mask is None else mask & padding
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

    description = "torch_npu.npu_fusion_attention (BSND)"
    supports_lse = False
    install = (TORCH_NPU_INSTALL,)

    @classmethod
    def check_available(cls, platform: str) -> None:
        load_torch_npu("sdpa")

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        torch_npu = load_torch_npu("sdpa")
        extra = {}
        if context is not None and context.key_lengths is not None:
            # [B, 1, S_q, S_kv] mask (True = masked), sparse_mode 0: padding and bottom-right causal.
            visible = key_padding_mask(context.key_lengths, k.shape[1]).expand(-1, 1, q.shape[1], -1)
            if causal:
                visible = visible & bottom_right_causal_mask(q.shape[1], k.shape[1], q.device)
            extra = {"atten_mask": (~visible).contiguous()}
        elif causal:
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


BACKEND = Backend(
    "sdpa",
    "torch scaled_dot_product_attention (npu_fusion_attention on Ascend)",
    platforms={
        "cpu": TorchSDPAImpl,
        "cuda": TorchSDPAImpl,
        "musa": TorchSDPAImpl,
        "npu": NpuFusionAttentionImpl,
    },
    order=0,
)
