"""Tiny random-weight instances of the real diffusers / transformers classes, built on the CPU, and
inputs for them. Pipelines carry a scheduler and transformers only (calls pass ``prompt_embeds``);
``complete=True`` adds a byte-level tokenizer, text encoder and VAE so ``pipe(prompt)`` makes pixels."""

from __future__ import annotations

import torch

WAN_TEXT_DIM = 16
QWEN_TEXT_DIM = 16

#: Special tokens of :func:`tiny_tokenizer`, at ids 0..3 (the tiny configs' pad/eos/bos ids).
TINY_SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TOKEN_IDS = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": BOS_ID}


def tiny_tokenizer():
    """Byte-level tokenizer made in code (4 special tokens + 256 bytes, no merges); saves like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate((*TINY_SPECIAL_TOKENS, *alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    pad, eos, bos, unk = TINY_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk
    )


def tiny_vocab_size() -> int:
    return len(TINY_SPECIAL_TOKENS) + 256


def tiny_umt5_encoder(*, seed: int = 0):
    """``UMT5EncoderModel`` (Wan's text encoder class), 1 layer of width ``WAN_TEXT_DIM``."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=tiny_vocab_size(),
        d_model=WAN_TEXT_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def _tiny_vae(cls, seed: int, **extra):
    """A VAE of Wan's or Qwen-Image's class with 4 latent channels and 4x spatial compression."""
    torch.manual_seed(seed)
    vae = cls(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
        **extra,
    )
    return vae.eval()


def tiny_qwen_vl_encoder(*, seed: int = 0):
    """``Qwen2_5_VLForConditionalGeneration``: 1 text layer of width ``QWEN_TEXT_DIM``, rotary sections
    (1, 1, 2), and a 1-block vision tower that text-only prompts never run."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": tiny_vocab_size(),
            "hidden_size": QWEN_TEXT_DIM,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            **TOKEN_IDS,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": QWEN_TEXT_DIM,
            "fullatt_block_indexes": [0],
        },
        vocab_size=tiny_vocab_size(),
        **TOKEN_IDS,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_wan_transformer(*, image_dim: int | None = None, layers: int = 2, seed: int = 0, head_dim: int = 12):
    """``WanTransformer3DModel`` with 2 heads of ``head_dim`` (divisible by 6 for rotary's three axes, or
    64: 22 + 21 + 21); ``image_dim`` makes it I2V (image cross-attention through ``add_k_proj``)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=head_dim,
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


def tiny_wan_pipeline(*, two_stage: bool = False, seed: int = 0, complete: bool = False, head_dim: int = 12):
    """``WanPipeline``; ``two_stage`` adds ``transformer_2`` with boundary_ratio 0.5 (Wan 2.2 A14B);
    ``complete``: frames 1 + 2k, sides multiples of 8; the VAE compresses time 2x."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    vae_scales = {"scale_factor_temporal": 2, "scale_factor_spatial": 4}
    return WanPipeline(
        tokenizer=tiny_tokenizer() if complete else None,
        text_encoder=tiny_umt5_encoder(seed=seed) if complete else None,
        vae=_tiny_vae(AutoencoderKLWan, seed, **vae_scales) if complete else None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(seed=seed, head_dim=head_dim),
        transformer_2=tiny_wan_transformer(seed=seed + 1, head_dim=head_dim) if two_stage else None,
        boundary_ratio=0.5 if two_stage else None,
    )


def tiny_qwen_image_transformer(*, layers: int = 2, seed: int = 0, head_dim: int = 16):
    """``QwenImageTransformer2DModel``: 2 heads of ``head_dim``, rotary axes split 1:1.5:1.5 (4, 6, 6 at
    16); in_channels 16 is 4 latent channels packed 2x2."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    axis = head_dim // 8 * 2
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=2,
        joint_attention_dim=QWEN_TEXT_DIM,
        axes_dims_rope=(head_dim - 2 * (3 * axis // 2), 3 * axis // 2, 3 * axis // 2),
    )
    return model.eval()


def tiny_qwen_image_pipeline(*, seed: int = 0, complete: bool = False):
    """``QwenImagePipeline``; ``complete``: sides multiples of 8."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(AutoencoderKLQwenImage, seed) if complete else None,
        text_encoder=tiny_qwen_vl_encoder(seed=seed) if complete else None,
        tokenizer=tiny_tokenizer() if complete else None,
        transformer=tiny_qwen_image_transformer(seed=seed),
    )


def tiny_qwen3_moe(
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vocab_size: int = 128,
    layers: int = 2,
    head_dim: int = 16,
):
    """``Qwen3MoeForCausalLM``: hidden 64, 4 query heads of ``head_dim`` sharing 2 KV heads, 4 experts with
    top-2 routing. ``vocab_size=tiny_vocab_size()`` pairs it with :func:`tiny_tokenizer`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        **TOKEN_IDS,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()
