"""attnbridge's processor for Wan: diffusers' ``WanAttnProcessor`` math (I2V included) on BSHD tensors.
With sequence parallelism the hidden states arrive as this rank's chunk: ``attn1`` runs
:class:`ParallelAttention`, ``attn2`` (cross-attention, keys held in full) stays local."""

from __future__ import annotations

import torch

from attnbridge.adapters.processor_base import BridgeProcessor
from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.parallel import ParallelAttention

#: Wan's text encoder context length: I2V puts the image tokens in front of these 512.
WAN_TEXT_TOKENS = 512


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of ``x`` [B, S, H, D]; cos/sin hold each angle twice."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _qkv(attn, hidden_states: torch.Tensor, context: torch.Tensor):
    if attn.fused_projections:
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        key, value = attn.to_kv(context).chunk(2, dim=-1)
        return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _image_kv(attn, image_states: torch.Tensor):
    if attn.fused_projections:
        return attn.to_added_kv(image_states).chunk(2, dim=-1)
    return attn.add_k_proj(image_states), attn.add_v_proj(image_states)


class WanAttnBridgeProcessor(BridgeProcessor):
    """Replaces ``WanAttnProcessor`` on one ``attn1``/``attn2`` module."""

    def __init__(self, layer: AttentionLayer, **kwargs) -> None:
        super().__init__(layer, **kwargs)
        # Built at enable time, so that a backend the ring cannot use fails before anything is patched.
        sharded = self.shards is not None and self.kind == "self"
        self.parallel = ParallelAttention(layer, self.shards.groups) if sharded else None

    def _attend(self, q, k, v, mask, *, sharded_keys: bool = False) -> torch.Tensor:
        if mask is not None:
            raise ValueError(
                f"{self.layer_name}: an attention_mask for Wan attention is not supported (diffusers' Wan "
                "blocks pass none); remove it or disable_npu_attention first"
            )
        context = self.state.context(self.kind)
        if sharded_keys and self.parallel is not None:
            return self.parallel(q, k, v, real_len=self.shards.real_len, context=context)
        return self.layer(q, k, v, context=context)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self.refuse_diffusers_parallelism()
        image_states = None
        if attn.add_k_proj is not None:
            image_tokens = encoder_hidden_states.shape[1] - WAN_TEXT_TOKENS
            image_states = encoder_hidden_states[:, :image_tokens]
            encoder_hidden_states = encoder_hidden_states[:, image_tokens:]
        is_self = encoder_hidden_states is None
        context_states = hidden_states if is_self else encoder_hidden_states
        query, key, value = _qkv(attn, hidden_states, context_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        image_out = None
        if image_states is not None:
            key_img, value_img = _image_kv(attn, image_states)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            image_out = self._attend(query, key_img, value_img, None).flatten(2, 3).type_as(query)
        out = (
            self._attend(query, key, value, attention_mask, sharded_keys=is_self).flatten(2, 3).type_as(query)
        )
        if image_out is not None:
            out = out + image_out
        return attn.to_out[1](attn.to_out[0](out))
