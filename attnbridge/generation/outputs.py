"""Writing a run's video, image or text and its timing summary. Videos are MP4 when imageio and
imageio-ffmpeg are installed, else an animated GIF through Pillow."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np


def _named(stem: Path, suffix: str) -> Path:
    """``stem`` + ``suffix`` (``with_suffix`` would eat a dotted model name such as ``Wan2.1``)."""
    return stem.with_name(stem.name + suffix)


def _to_uint8_frames(frames: Any) -> list[np.ndarray]:
    """``[F, H, W, C]`` floats in [0, 1] (diffusers' ``np`` output) or PIL images -> uint8 arrays."""
    if isinstance(frames, np.ndarray) and frames.dtype != np.uint8:
        return [(np.clip(f, 0.0, 1.0) * 255).round().astype(np.uint8) for f in frames]
    return [np.asarray(f, dtype=np.uint8) for f in frames]


def write_video(frames: Any, stem: Path, fps: int = 8) -> Path:
    frames = _to_uint8_frames(frames)
    if all(importlib.util.find_spec(name) is not None for name in ("imageio", "imageio_ffmpeg")):
        from diffusers.utils import export_to_video

        path = _named(stem, ".mp4")
        export_to_video([f.astype(np.float32) / 255.0 for f in frames], str(path), fps=fps)
        return path
    from PIL import Image

    path = _named(stem, ".gif")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def write_image(image: Any, stem: Path) -> Path:
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(_to_uint8_frames(np.asarray(image)[None])[0])
    path = _named(stem, ".png")
    image.save(path)
    return path


def write_text(prompt: str, completion: str, stem: Path) -> Path:
    path = _named(stem, ".txt")
    path.write_text(f"{prompt}{completion}\n", encoding="utf-8")
    return path


def write_summary(summary: dict[str, Any], stem: Path) -> Path:
    path = _named(stem, ".timing.json")
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return path
