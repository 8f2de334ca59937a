"""Inputs for the tiny models of :mod:`attnbridge.tiny_models`: transformer call keywords and latent-output
pipeline call arguments with random prompt embeddings."""

from __future__ import annotations

import torch

from attnbridge.tiny_models import QWEN_TEXT_DIM, WAN_TEXT_DIM


def wan_inputs(
    *,
    frames: int = 2,
    height: int = 8,
    width: int = 6,
    text_tokens: int = 7,
    image_tokens: int = 0,
    seed: int = 1,
):
    """Keyword inputs of a Wan transformer call; patched grid (frames, height/2, width/2). With
    ``image_tokens`` the text is 512 tokens, as I2V models read the last 512 as text."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(1, 4, frames, height, width, generator=gen),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(
            1, 512 if image_tokens else text_tokens, WAN_TEXT_DIM, generator=gen
        ),
    }
    if image_tokens:
        inputs["encoder_hidden_states_image"] = torch.randn(1, image_tokens, 8, generator=gen)
    return inputs


def _pipeline_kwargs(
    seed: int, steps: int, cfg: bool, text_dim: int, tokens: int, negative_tokens: int, **call
):
    """Latent-output call arguments with random prompt embeddings (and negative ones with ``cfg``)."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {
        "prompt_embeds": torch.randn(1, tokens, text_dim, generator=gen),
        "num_inference_steps": steps,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed + 1),
        **call,
    }
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(1, negative_tokens, text_dim, generator=gen)
    return kwargs


def wan_pipeline_kwargs(*, steps: int = 3, cfg: bool = True, seed: int = 2):
    """Call arguments: 5 frames of 32x32 -> latents 2 x 4 x 4 -> patched grid (2, 2, 2)."""
    sizes = {"height": 32, "width": 32, "num_frames": 5}
    return _pipeline_kwargs(seed, steps, cfg, WAN_TEXT_DIM, 7, 7, guidance_scale=5.0 if cfg else 1.0, **sizes)


def qwen_image_inputs(
    *, batch: int = 1, grid_h: int = 3, grid_w: int = 4, text_tokens: int = 5, text_mask=None, seed: int = 1
):
    """Keyword inputs of a Qwen-Image transformer call with a packed (1, grid_h, grid_w) image."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, grid_h * grid_w, 16, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_tokens, QWEN_TEXT_DIM, generator=gen),
        "encoder_hidden_states_mask": text_mask,
        "timestep": torch.full((batch,), 0.7),
        "img_shapes": [[(1, grid_h, grid_w)]] * batch,
    }


def qwen_image_pipeline_kwargs(*, steps: int = 3, cfg: bool = True, seed: int = 2):
    """64x64 pixels -> 8x8 latents -> packed grid (1, 4, 4) of 16 image tokens."""
    mask = torch.ones(1, 5, dtype=torch.long)
    kwargs = _pipeline_kwargs(
        seed, steps, cfg, QWEN_TEXT_DIM, 5, 3, prompt_embeds_mask=mask, height=64, width=64
    )
    if cfg:
        kwargs["negative_prompt_embeds_mask"] = torch.ones(1, 3, dtype=torch.long)
        kwargs["true_cfg_scale"] = 4.0
    return kwargs
