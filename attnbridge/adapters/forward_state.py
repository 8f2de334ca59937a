"""What the current transformer forward call looks like, shared by that transformer's processors.

A forward pre-hook on the transformer fills it (grid, step, padding facts) once per call; every
attention processor reads it to build its :class:`AttentionContext`, so nothing is recomputed per
layer and nothing lives in globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attnbridge.attention.contract import AttentionContext


@dataclass
class ForwardState:
    grid: tuple[int, int, int] | None = None
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: True/False while a forward runs and its text mask was seen; None outside a forward.
    text_mask_all_valid: bool | None = None
    #: Pipeline attribute of the transformer ("transformer", "transformer_2"), "" for a bare model.
    component: str = ""

    def context(
        self, kind: str, layer_name: str, *, num_text_tokens: int = 0, **extra: Any
    ) -> AttentionContext:
        merged = {**self.extra, **extra}
        if self.component:
            merged["component"] = self.component
        return AttentionContext(
            kind=kind,
            grid=self.grid,
            step=self.step,
            num_text_tokens=num_text_tokens,
            layer_name=layer_name,
            extra=merged,
        )
