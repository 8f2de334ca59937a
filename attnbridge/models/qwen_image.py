"""Qwen-Image MMDiT (diffusers ``QwenImageTransformer2DModel``).

* ``transformer_blocks.N.attn``: joint attention over ``[text tokens, image tokens]``; text comes
  FIRST (the processor concatenates ``txt`` then ``img``), which is the order the contract expects.
* Image tokens are 2x2-packed latents: the pipeline passes ``img_shapes``, per sample a list of
  ``(frames, latent_h // 2, latent_w // 2)``; edit pipelines append the condition images, which the
  rotary embedding places as further frames.
* A text padding mask (``encoder_hidden_states_mask``) masks keys only; pipelines drop it when every
  token is valid.
* Sequence parallelism splits the image tokens only; the text stream (a prompt of any length) stays
  replicated on every rank, so the text entries of diffusers' ``_cp_plan`` are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnbridge.models.family import AttentionSite, GridInfo, ModelFamily


def _image_shapes_of_first_sample(img_shapes: Any) -> list[tuple[int, int, int]]:
    """The per-sample shape list, read the way the model's rotary embedding reads it."""
    shapes = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
    if not isinstance(shapes, list):
        shapes = [shapes]
    return [tuple(int(n) for n in shape) for shape in shapes]


def qwen_image_grid(model: torch.nn.Module, inputs: Mapping[str, Any]) -> GridInfo:
    """Grid of the image tokens from ``img_shapes``.

    Images of one size stack along T (as their rotary frame index does), so ``T*H*W`` equals the
    image token count. Mixed sizes (edit pipelines with reference images of other sizes) have no
    common spatial grid: the tokens are then one raster row ``(1, 1, N)``, which block masks can
    still cut into consecutive blocks. ``extra["img_shapes"]`` lists every image either way.
    """
    img_shapes = inputs.get("img_shapes")
    if not img_shapes:
        return None, {}
    shapes = _image_shapes_of_first_sample(img_shapes)
    _, height, width = shapes[0]
    if all((h, w) == (height, width) for _, h, w in shapes):
        grid = (sum(f for f, _, _ in shapes), height, width)
    else:
        grid = (1, 1, sum(f * h * w for f, h, w in shapes))
    return grid, {"img_shapes": tuple(shapes)}


QWEN_IMAGE = ModelFamily(
    name="qwen_image",
    library="diffusers",
    class_names=("QwenImageTransformer2DModel",),
    attention_sites=(AttentionSite(r"(^|\.)transformer_blocks\.\d+\.attn$", "joint"),),
    processor_names=("QwenDoubleStreamAttnProcessor2_0",),
    grid_from_inputs=qwen_image_grid,
    timestep_arg="timestep",
    text_mask_arg="encoder_hidden_states_mask",
    pipeline_components=("transformer",),
    sequence_replicated=(
        "transformer_blocks.0/encoder_hidden_states",
        "transformer_blocks.*/encoder_hidden_states_mask",
        "pos_embed/1",  # the text rotary table
    ),
    notes="Qwen-Image text-to-image and edit pipelines",
)
