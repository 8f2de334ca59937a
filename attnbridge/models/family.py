"""What attnbridge knows about a model family: how to recognise it, where its attention is, how to read
its forward inputs."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: The ``(T, H, W)`` token grid read from a forward call's inputs, or ``None``.
Grid = tuple[int, int, int] | None


@dataclass(frozen=True)
class AttentionSite:
    """Attention modules whose dotted path matches ``pattern`` (searched, not anchored at 0)."""

    pattern: str
    kind: str  # "self" | "cross" | "joint"
    causal: bool = False

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


@dataclass(frozen=True)
class ModelFamily:
    """A model belongs to the family when a class in its MRO is named in ``class_names`` (no library import
    needed) or its ``config.model_type`` is in ``model_types``."""

    name: str
    library: str
    class_names: tuple[str, ...]
    attention_sites: tuple[AttentionSite, ...]
    model_types: tuple[str, ...] = ()
    #: diffusers processor classes we know how to replace (anything else is a user customisation).
    processor_names: tuple[str, ...] = ()
    #: Reads the token grid from the bound forward arguments of the model.
    grid_from_inputs: Callable[[torch.nn.Module, Mapping[str, Any]], Grid] | None = None
    #: Forward argument carrying the diffusion timestep (the step counter watches it).
    timestep_arg: str | None = None
    #: Reads a joint sequence's text padding: (valid keys per sample, int ``[B]``, or None; the text
    #: tokens attention keeps, a host int, or None for all).
    text_padding_from_inputs: Callable[[Mapping[str, Any]], tuple[torch.Tensor | None, int | None]] | None = (
        None
    )
    #: Pipeline attributes that hold models of this family (Wan 2.2 A14B has two).
    pipeline_components: tuple[str, ...] = ()
    #: ``_cp_plan`` entries kept replicated, not split, as ``"<module key>/<input name or output index>"``.
    sequence_replicated: tuple[str, ...] = ()
    notes: str = field(default="", compare=False)

    def matches(self, obj: Any) -> bool:
        if any(cls.__name__ in self.class_names for cls in type(obj).__mro__):
            return True
        model_type = getattr(getattr(obj, "config", None), "model_type", None)
        return isinstance(obj, torch.nn.Module) and model_type is not None and model_type in self.model_types

    def attention_modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, AttentionSite]]:
        """``(dotted path, module, site)`` of every attention module; ``ValueError`` when there is none."""
        found = []
        for path, module in model.named_modules():
            site = next((s for s in self.attention_sites if s.matches(path)), None)
            if site is not None:
                found.append((path, module, site))
        if not found:
            raise ValueError(
                f"{type(model).__name__}: found no attention modules matching "
                f"{[s.pattern for s in self.attention_sites]}; this {self.library} version is not supported"
            )
        return found
