"""``enable_npu_attention`` / ``disable_npu_attention``: the one-line user API.

Accepts a diffusers pipeline (every supported transformer component is patched: ``transformer``,
``transformer_2``), a diffusers transformer, or a transformers model. Everything is checked and
built first (backend name and options, object type, processors, kernels); only then is anything
changed, so an error leaves the object as it was.
"""

from __future__ import annotations

from typing import Any

import torch

from attnbridge.adapters.diffusers import (
    is_pipeline,
    plan_diffusers_model,
    plan_pipeline,
    supported_pipeline_components,
)
from attnbridge.adapters.options import validate_backend
from attnbridge.adapters.steps import StepTracker
from attnbridge.adapters.transformers import plan_transformers_model
from attnbridge.attention.api import AttentionLayer
from attnbridge.models import find_family, supported_models

#: Attribute on each patched object (pipeline or model) holding the handle that patched it; it lives
#: and dies with the object (a global registry would keep patched models alive).
HANDLE_ATTR = "_attnbridge_handle"


class AttentionHandle:
    """What ``enable_npu_attention`` changed; ``disable()`` (or leaving a ``with`` block) undoes it."""

    def __init__(
        self, obj: Any, backend: str, config: dict[str, Any], patch: Any, models: list[torch.nn.Module]
    ):
        self.obj = obj
        self.backend = backend
        self.config = dict(config)
        self._patch = patch
        self._models = models
        self.enabled = False

    @property
    def layers(self) -> dict[str, AttentionLayer]:
        """Every AttentionLayer made, keyed ``"<component>.<module path>"`` for pipelines."""
        patches = getattr(self._patch, "models", [self._patch])
        layers = {}
        for patch in patches:
            prefix = (
                f"{patch.state.component}." if getattr(patch, "state", None) and patch.state.component else ""
            )
            layers.update({prefix + name: layer for name, layer in patch.layers.items()})
        return layers

    def reset_steps(self) -> None:
        """Start the denoising step count again (pipelines do this on every call)."""
        tracker = getattr(self._patch, "tracker", None)
        if tracker is not None:
            tracker.reset()

    def _apply(self) -> None:
        self._patch.apply()
        self.enabled = True
        for target in (self.obj, *self._models):
            target.__dict__[HANDLE_ATTR] = self  # past custom __setattr__ (pipeline config, nn.Module)

    def disable(self) -> None:
        if not self.enabled:
            return
        self._patch.remove()
        self.enabled = False
        for target in (self.obj, *self._models):
            if _active_handle(target) is self:
                del target.__dict__[HANDLE_ATTR]

    def __enter__(self) -> AttentionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"AttentionHandle({type(self.obj).__name__}, backend={self.backend!r}, {state}, {len(self.layers)} layers)"


def _active_handle(obj: Any) -> AttentionHandle | None:
    handle = getattr(obj, "__dict__", {}).get(HANDLE_ATTR)
    return handle if isinstance(handle, AttentionHandle) else None


def _unsupported(obj: Any) -> TypeError:
    return TypeError(
        f"enable_npu_attention does not support {type(obj).__module__}.{type(obj).__name__}; it accepts a "
        f"diffusers pipeline with {supported_pipeline_components()}, or one of these models: {supported_models()}"
    )


def _plan(obj: Any, spec, config, platform, strict):
    """(patch, patched models) for ``obj``; raises before changing anything."""
    if is_pipeline(obj):
        patch = plan_pipeline(obj, spec, config, platform=platform, strict=strict)
        return patch, [p.model for p in patch.models]
    family = find_family(obj) if isinstance(obj, torch.nn.Module) else None
    if family is None:
        raise _unsupported(obj)
    if family.library == "diffusers":
        tracker = StepTracker()
        patch = plan_diffusers_model(
            obj, family, spec, config, platform=platform, strict=strict, tracker=tracker
        )
    else:
        patch = plan_transformers_model(obj, family, spec, config, platform=platform, strict=strict)
    return patch, [obj]


def enable_npu_attention(
    obj: Any,
    backend: str = "sdpa",
    *,
    strict: bool = False,
    platform: str | None = None,
    **backend_config: Any,
) -> AttentionHandle:
    """Route every attention call of ``obj`` through attnbridge ``backend`` and return the handle.

    ``backend_config`` holds the backend's options (``sparsity=0.75``, ``skip_first_steps=5``);
    ``platform`` forces a platform's kernels (default: the tensors' device); ``strict=True`` makes a
    missing kernel package an error instead of a logged fallback. Enabling an already enabled
    object first disables it.
    """
    spec = validate_backend(backend, backend_config, platform)
    patch, models = _plan(obj, spec, backend_config, platform, strict)
    for target in (obj, *models):
        previous = _active_handle(target)
        if previous is not None:
            previous.disable()
    handle = AttentionHandle(obj, spec.name, backend_config, patch, models)
    handle._apply()
    return handle


def disable_npu_attention(obj: Any) -> bool:
    """Restore ``obj``'s original processors / attention implementation (the same objects).

    ``obj`` is what was passed to :func:`enable_npu_attention` (or a model inside that pipeline, or
    the handle). Returns whether anything was enabled.
    """
    handle = obj if isinstance(obj, AttentionHandle) else _active_handle(obj)
    if handle is None or not handle.enabled:
        return False
    handle.disable()
    return True


__all__ = ["AttentionHandle", "disable_npu_attention", "enable_npu_attention"]
