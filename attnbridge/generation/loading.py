"""What ``--model`` names: an embedded tiny random model, or a local checkpoint folder (a diffusers
pipeline with ``model_index.json``, a transformers causal LM with ``config.json``). Nothing is downloaded."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnbridge import tiny_models


@dataclass
class LoadedModel:
    """``kind``: ``"diffusion"`` (a pipeline) or ``"text"`` (an LLM + tokenizer); ``call_defaults``: the tiny
    models' small sizes."""

    name: str
    kind: str
    obj: Any
    tokenizer: Any = None
    call_defaults: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False


@dataclass(frozen=True)
class TinyModel:
    kind: str
    build: Callable[[int], Any]
    call_defaults: dict[str, Any]


def _tiny_llm(seed: int):
    model = tiny_models.tiny_qwen3_moe(seed=seed, vocab_size=tiny_models.tiny_vocab_size())
    return model, tiny_models.tiny_tokenizer()


TINY_MODELS: dict[str, TinyModel] = {
    "wan-tiny": TinyModel(
        "diffusion",
        lambda seed: tiny_models.tiny_wan_pipeline(seed=seed, complete=True, head_dim=64),
        # 17 frames of 64x128 -> a (9, 8, 16) grid of 1,152 tokens: nine 128-token blocks and 4x4x4
        # tiles, so sparse backends skip most of the work; heads of 64, which every sparse kernel takes.
        {
            "height": 64,
            "width": 128,
            "num_frames": 17,
            "max_sequence_length": 16,
            "guidance_scale": 5.0,
            "negative_prompt": "blurry",
        },
    ),
    "qwen-image-tiny": TinyModel(
        "diffusion",
        lambda seed: tiny_models.tiny_qwen_image_pipeline(seed=seed, complete=True),
        {"height": 32, "width": 32, "true_cfg_scale": 4.0, "negative_prompt": "blurry"},
    ),
    "qwen3-moe-tiny": TinyModel("text", _tiny_llm, {}),
}


def load_model(spec: str, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    tiny = TINY_MODELS.get(spec)
    if tiny is not None:
        return _load_tiny(spec, tiny, device, dtype, seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"unknown model {spec!r}: not an embedded tiny model ({', '.join(TINY_MODELS)}) and no such "
            "folder (a local checkpoint folder is needed: nothing is downloaded)"
        )
    if not path.is_dir():
        raise ValueError(f"model path {spec!r} is a file; pass the checkpoint folder")
    if (path / "model_index.json").is_file():
        return _load_pipeline(path, device, dtype)
    if (path / "config.json").is_file():
        return _load_causal_lm(path, device, dtype)
    raise ValueError(
        f"model folder {spec!r} has neither model_index.json (a diffusers pipeline) nor config.json "
        "(a transformers model); pass the folder save_pretrained wrote"
    )


def _load_tiny(name: str, tiny: TinyModel, device, dtype, seed: int) -> LoadedModel:
    built = tiny.build(seed)
    obj, tokenizer = built if tiny.kind == "text" else (built, None)
    # Built in float32: cast only when asked for another dtype (diffusers warns on every cast).
    obj = obj.to(device) if dtype == torch.float32 else obj.to(device=device, dtype=dtype)
    if hasattr(obj, "set_progress_bar_config"):
        obj.set_progress_bar_config(disable=True)
    return LoadedModel(name, tiny.kind, obj, tokenizer, dict(tiny.call_defaults), random_weights=True)


def _load_pipeline(path: Path, device, dtype) -> LoadedModel:
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        # Newer diffusers renamed torch_dtype to dtype (with a warning); older ones only know torch_dtype.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype)
    return LoadedModel(_name_of(path), "diffusion", pipe.to(device))


def _load_causal_lm(path: Path, device, dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(f"model folder {str(path)!r} is not a transformers causal LM: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, OSError, TypeError) as error:
        raise ValueError(
            f"model folder {str(path)!r} has no usable tokenizer (save it next to the model): {error}"
        ) from error
    return LoadedModel(_name_of(path), "text", model.to(device).eval(), tokenizer)


def _name_of(path: Path) -> str:
    return os.path.basename(os.path.normpath(str(path))) or "model"
