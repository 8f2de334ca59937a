"""The model families attnbridge knows: how to recognise them and where their attention is."""

from __future__ import annotations

from typing import Any

from attnbridge.models.family import ModelFamily
from attnbridge.models.qwen3_moe import QWEN3_MOE
from attnbridge.models.qwen_image import QWEN_IMAGE
from attnbridge.models.wan import WAN

FAMILIES: tuple[ModelFamily, ...] = (WAN, QWEN_IMAGE, QWEN3_MOE)


def find_family(obj: Any) -> ModelFamily | None:
    """The family ``obj`` (a model, not a pipeline) belongs to, or ``None``."""
    return next((family for family in FAMILIES if family.matches(obj)), None)


def supported_models() -> str:
    """One line per library naming the supported classes, for error messages."""
    by_library: dict[str, list[str]] = {}
    for family in FAMILIES:
        by_library.setdefault(family.library, []).extend(family.class_names)
    return "; ".join(f"{lib}: {', '.join(names)}" for lib, names in by_library.items())


__all__ = ["FAMILIES", "ModelFamily", "find_family", "supported_models"]
