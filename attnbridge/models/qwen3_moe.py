"""Qwen3-MoE causal LM (transformers ``Qwen3MoeForCausalLM`` / ``Qwen3MoeModel``).

``model.layers.N.self_attn``: causal self-attention with grouped-query heads (``num_key_value_heads``
< ``num_attention_heads``), called through transformers' ``AttentionInterface`` with q/k/v in
``[B, H, S, D]``. No latent grid: the only context is the layer and causality.
"""

from __future__ import annotations

from attnbridge.models.family import AttentionSite, ModelFamily

QWEN3_MOE = ModelFamily(
    name="qwen3_moe",
    library="transformers",
    class_names=("Qwen3MoeForCausalLM", "Qwen3MoeModel"),
    model_types=("qwen3_moe",),
    attention_sites=(AttentionSite(r"(^|\.)layers\.\d+\.self_attn$", "self", causal=True),),
    notes="Qwen3-MoE (e.g. Qwen3-30B-A3B); causal, GQA",
)
