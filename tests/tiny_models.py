"""Tiny random-weight instances of the real diffusers / transformers classes, built on the CPU
without downloads, and inputs for them.

Pipelines are the real ``WanPipeline`` / ``QwenImagePipeline`` classes with a real scheduler and
tiny transformers; tokenizer, text encoder and VAE are ``None`` because the calls pass
``prompt_embeds`` and ``output_type="latent"`` (the text encoders' tokenizers need vocab files,
and neither is on the attention path).
"""

from __future__ import annotations

import torch

WAN_TEXT_DIM = 16
QWEN_TEXT_DIM = 16


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_wan_transformer(*, image_dim: int | None = None, layers: int = 2, seed: int = 0):
    """``WanTransformer3DModel`` with 2 heads of 12 (rotary needs head_dim divisible by 6);
    ``image_dim`` makes it an I2V model (image cross-attention through ``add_k_proj``)."""
    from diffusers import WanTransformer3DModel

    _seeded(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=WAN_TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=layers,
        rope_max_seq_len=32,
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 24,
    )
    return model.eval()


def wan_inputs(
    *,
    frames: int = 2,
    height: int = 8,
    width: int = 6,
    text_tokens: int = 7,
    image_tokens: int = 0,
    seed: int = 1,
):
    """Keyword inputs of a Wan transformer call; the patched grid is (frames, height/2, width/2).

    I2V models read the last 512 text tokens as text and the rest as image tokens, so with
    ``image_tokens`` the text is padded to 512 the way the pipeline does.
    """
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


def tiny_wan_pipeline(*, two_stage: bool = False, seed: int = 0):
    """``WanPipeline``; ``two_stage`` adds ``transformer_2`` with boundary_ratio 0.5 (Wan 2.2 A14B)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(seed=seed),
        transformer_2=tiny_wan_transformer(seed=seed + 1) if two_stage else None,
        boundary_ratio=0.5 if two_stage else None,
    )


def wan_pipeline_kwargs(*, steps: int = 3, cfg: bool = True, seed: int = 2):
    """Call arguments: 5 frames of 32x32 -> latents 2 x 4 x 4 -> patched grid (2, 2, 2)."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {
        "prompt_embeds": torch.randn(1, 7, WAN_TEXT_DIM, generator=gen),
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "num_inference_steps": steps,
        "guidance_scale": 5.0 if cfg else 1.0,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed + 1),
    }
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(1, 7, WAN_TEXT_DIM, generator=gen)
    return kwargs


def tiny_qwen_image_transformer(*, layers: int = 2, seed: int = 0):
    """``QwenImageTransformer2DModel``: 2 heads of 16, rotary axes (4, 6, 6); in_channels 16 is
    4 latent channels packed 2x2."""
    from diffusers import QwenImageTransformer2DModel

    _seeded(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=QWEN_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    return model.eval()


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


def tiny_qwen_image_pipeline(*, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=tiny_qwen_image_transformer(seed=seed),
    )


def qwen_image_pipeline_kwargs(*, steps: int = 3, cfg: bool = True, seed: int = 2):
    """64x64 pixels -> 8x8 latents -> packed grid (1, 4, 4) of 16 image tokens."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {
        "prompt_embeds": torch.randn(1, 5, QWEN_TEXT_DIM, generator=gen),
        "prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long),
        "height": 64,
        "width": 64,
        "num_inference_steps": steps,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed + 1),
    }
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(1, 3, QWEN_TEXT_DIM, generator=gen)
        kwargs["negative_prompt_embeds_mask"] = torch.ones(1, 3, dtype=torch.long)
        kwargs["true_cfg_scale"] = 4.0
    return kwargs


def tiny_qwen3_moe(*, seed: int = 0, attn_implementation: str = "sdpa"):
    """``Qwen3MoeForCausalLM``: 2 layers, hidden 64, 4 query heads sharing 2 KV heads (GQA),
    4 experts with top-2 routing."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    _seeded(seed)
    model = Qwen3MoeForCausalLM(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()
