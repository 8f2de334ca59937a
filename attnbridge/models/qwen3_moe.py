"""Qwen3-MoE causal LM: GQA self-attention in ``model.layers.N.self_attn`` via ``AttentionInterface``."""

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
