"""Qwen-Image MMDiT (diffusers ``QwenImageTransformer2DModel``).

* ``transformer_blocks.N.attn``: joint attention. attnbridge orders it ``[image, text]`` (upstream:
  ``[text, image]``; keys' order does not matter), so the text padding mask becomes valid key lengths;
  text past the batch's longest prompt is left out of the keys.
* ``img_shapes``: per sample a list of ``(frames, latent_h // 2, latent_w // 2)`` (2x2-packed latents);
  edit pipelines append the condition images as further frames.
* Sequence parallelism splits the image tokens only; the text stays replicated on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnbridge.attention.masks import leading_lengths
from attnbridge.models.family import AttentionSite, Grid, ModelFamily


def qwen_image_grid(model: torch.nn.Module, inputs: Mapping[str, Any]) -> Grid:
    """Image token grid from ``img_shapes``: images of one size stack along T (as their rotary frame index
    does); mixed sizes have no common grid and give one raster row ``(1, 1, N)``."""
    img_shapes = inputs.get("img_shapes")
    if not img_shapes:
        return None
    # The first sample's shape list, read the way the rotary embedding reads it.
    shapes = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
    if not isinstance(shapes, list):
        shapes = [shapes]
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    _, height, width = shapes[0]
    if all((h, w) == (height, width) for _, h, w in shapes):
        return (sum(f for f, _, _ in shapes), height, width)
    return (1, 1, sum(f * h * w for f, h, w in shapes))


def qwen_image_text_padding(inputs: Mapping[str, Any]) -> tuple[torch.Tensor | None, int | None]:
    """``(key_lengths, kept_text)`` from ``encoder_hidden_states_mask`` ``[B, S_txt]`` (padding last in each
    prompt, 1 = a real token). ``kept_text``: the longest prompt, when shorter than ``S_txt`` (the text past
    it is padding in every sample, which attention need not read); ``key_lengths``: valid keys per sample of
    ``[image, text[:kept_text]]``, None when every sample has them all. Outside ``torch.compile`` this costs
    two host syncs per forward (the padding-last check, then the lengths); under it, the lengths stay a
    tensor and nothing is kept apart."""
    mask = inputs.get("encoder_hidden_states_mask")
    hidden = inputs.get("hidden_states")
    if mask is None or not isinstance(hidden, torch.Tensor):
        return None, None
    text = leading_lengths(mask)
    if text is None:
        raise ValueError(
            "encoder_hidden_states_mask must mark each prompt's real tokens first and its padding "
            "last (as the Qwen-Image pipelines' tokenizer makes it)"
        )
    key_lengths = (hidden.shape[1] + text).to(torch.int32)
    if torch.compiler.is_compiling():
        return key_lengths, None
    lengths = text.tolist()
    longest = max(lengths, default=mask.shape[-1])
    kept_text = longest if longest < mask.shape[-1] else None
    return (None if min(lengths, default=longest) == longest else key_lengths), kept_text


QWEN_IMAGE = ModelFamily(
    name="qwen_image",
    library="diffusers",
    class_names=("QwenImageTransformer2DModel",),
    attention_sites=(AttentionSite(r"(^|\.)transformer_blocks\.\d+\.attn$", "joint"),),
    processor_names=("QwenDoubleStreamAttnProcessor2_0",),
    grid_from_inputs=qwen_image_grid,
    timestep_arg="timestep",
    text_padding_from_inputs=qwen_image_text_padding,
    pipeline_components=("transformer",),
    sequence_replicated=(
        "transformer_blocks.0/encoder_hidden_states",
        "transformer_blocks.*/encoder_hidden_states_mask",
        "pos_embed/1",  # the text rotary table
    ),
    notes="Qwen-Image text-to-image and edit pipelines",
)
