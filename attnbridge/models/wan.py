"""Wan 2.1 / 2.2 video DiT (diffusers ``WanTransformer3DModel``): ``blocks.N.attn1`` self-attention over
the patched grid in ``(t, h, w)`` raster order; ``blocks.N.attn2`` cross-attention to the text (the last
512 tokens) and, for I2V (``added_kv_proj_dim`` set), the image tokens before it. A14B pipelines hold
two: ``transformer`` for high noise, ``transformer_2`` for low noise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnbridge.models.family import AttentionSite, Grid, ModelFamily


def wan_grid(model: torch.nn.Module, inputs: Mapping[str, Any]) -> Grid:
    """``(T, H, W)`` after patching, from ``hidden_states`` ``[B, C, F, H, W]`` and ``config.patch_size``."""
    hidden_states = inputs.get("hidden_states")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        return None
    p_t, p_h, p_w = model.config.patch_size
    _, _, frames, height, width = hidden_states.shape
    return (frames // p_t, height // p_h, width // p_w)


WAN = ModelFamily(
    name="wan",
    library="diffusers",
    class_names=("WanTransformer3DModel",),
    attention_sites=(
        AttentionSite(r"(^|\.)blocks\.\d+\.attn1$", "self"),
        AttentionSite(r"(^|\.)blocks\.\d+\.attn2$", "cross"),
    ),
    processor_names=("WanAttnProcessor", "WanAttnProcessor2_0"),
    grid_from_inputs=wan_grid,
    timestep_arg="timestep",
    pipeline_components=("transformer", "transformer_2"),
    notes="Wan 2.1/2.2 T2V, I2V, TI2V and the two-expert A14B pipelines",
)
