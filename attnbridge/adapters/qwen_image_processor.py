"""attnbridge's processor for Qwen-Image's joint attention: diffusers'
``QwenDoubleStreamAttnProcessor2_0`` math, the kernel call through the module's
:class:`AttentionLayer`, the joint sequence ordered ``[image, text]``."""

from __future__ import annotations

import torch

from attnbridge.adapters.joint_parallel import joint_attention_replicated_text
from attnbridge.adapters.processor_base import BridgeProcessor
from attnbridge.attention.contract import AttentionContext


def _qwen_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, D] by complex ``freqs`` [S, D/2] (pairs are (real, imag))."""
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs.unsqueeze(1)).flatten(3).type_as(x)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class QwenImageAttnBridgeProcessor(BridgeProcessor):
    """Replaces ``QwenDoubleStreamAttnProcessor2_0`` on one ``transformer_blocks.N.attn``."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError(
                f"{self.layer_name}: Qwen-Image joint attention needs encoder_hidden_states (text)"
            )
        if attention_mask is not None:
            raise ValueError(
                f"{self.layer_name}: Qwen-Image attention takes no attention_mask; pass encoder_hidden_states_mask"
            )
        self.refuse_diffusers_parallelism()
        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = (
            _heads(proj(hidden_states), head_dim) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        txt_q, txt_k, txt_v = (
            _heads(proj(encoder_hidden_states), head_dim)
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        img_q, img_k = _norm(attn.norm_q, img_q), _norm(attn.norm_k, img_k)
        txt_q, txt_k = _norm(attn.norm_added_q, txt_q), _norm(attn.norm_added_k, txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q, img_k = _qwen_rotary(img_q, img_freqs), _qwen_rotary(img_k, img_freqs)
            txt_q, txt_k = _qwen_rotary(txt_q, txt_freqs), _qwen_rotary(txt_k, txt_freqs)
        text, image = (txt_q, txt_k, txt_v), (img_q, img_k, img_v)
        if self.shards is not None:
            return self._sharded(attn, text, image)
        kept = self.state.kept_text  # text past the longest prompt pads every sample: no key needs it
        key_text = text if kept is None else tuple(x[:, :kept] for x in text)
        # Image first, then text: the contract's joint order, and the text padding ends each sample.
        query = torch.cat([image[0], text[0]], dim=1)
        key, value = (torch.cat(pair, dim=1) for pair in zip(image[1:], key_text[1:]))
        context = self.state.context(self.kind, num_text_tokens=key_text[0].shape[1])
        joint = self._joint(query, key, value, context)
        joint = joint.flatten(2, 3).to(query.dtype)
        seq_img = hidden_states.shape[1]
        return self._project(attn, joint[:, seq_img:], joint[:, :seq_img])

    def _joint(self, query, key, value, context):
        """Joint attention; text queries past the keys (padding left out of them) still get their rows, in
        the same call where the kernel takes them, else in a second one over the same keys."""
        s_kv = key.shape[1]
        if query.shape[1] == s_kv or self.layer.impl_for(query.device).serves_text_tail(context):
            return self.layer(query, key, value, context=context)
        tail_context = AttentionContext(kind="cross", key_lengths=context.key_lengths)
        head = self.layer(query[:, :s_kv], key, value, context=context)
        return torch.cat([head, self.layer(query[:, s_kv:], key, value, context=tail_context)], dim=1)

    def _sharded(self, attn, text, image):
        """Joint attention with this rank's image chunk and the whole (replicated) text."""
        if self.state.key_lengths is not None or self.state.kept_text is not None:
            raise ValueError(
                f"{self.layer_name}: a padded text batch (encoder_hidden_states_mask with zeros) is not "
                "supported with sequence parallelism; run prompts of one length per batch"
            )
        context = self.state.context(self.kind, num_text_tokens=text[0].shape[1])
        txt_out, img_out = joint_attention_replicated_text(
            self.layer, self.shards.groups, text, image, real_len=self.shards.real_len, context=context
        )
        dtype = image[0].dtype
        return self._project(attn, txt_out.flatten(2, 3).to(dtype), img_out.flatten(2, 3).to(dtype))

    @staticmethod
    def _project(attn, txt_out: torch.Tensor, img_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out
