"""``enable_npu_attention`` / ``disable_npu_attention`` for a diffusers pipeline (every supported
transformer component), a diffusers transformer or a transformers model. Everything is checked and
built before anything changes, so an error leaves the object as it was."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attnbridge.adapters.diffusers import (
    is_pipeline,
    pipeline_transformers,
    plan_diffusers_model,
    plan_pipeline,
    supported_pipeline_components,
)
from attnbridge.adapters.steps import step_source
from attnbridge.adapters.transformers import plan_transformers_model
from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.parallel import ParallelConfig, build_parallel_groups, init_distributed
from attnbridge.attention.parallel.distributed import launched_world_size
from attnbridge.attention.parallel.usp import check_ring_backend
from attnbridge.attention.registry import get_backend
from attnbridge.models import find_family, supported_models
from attnbridge.platforms import get_platform

#: Attribute on each patched pipeline / model holding its handle (a global registry would keep them alive).
HANDLE_ATTR = "_attnbridge_handle"


class AttentionHandle:
    """What ``enable_npu_attention`` changed; ``disable()`` (or leaving a ``with`` block) undoes it."""

    def __init__(self, obj: Any, backend: str, patch: Any, models: list[torch.nn.Module], parallel=None):
        self.obj = obj
        self.backend = backend
        self._patch = patch
        self._models = models
        #: The ring / Ulysses degrees or the CP size this object was enabled with.
        self.parallel = parallel or ParallelConfig()
        self.enabled = False

    @property
    def layers(self) -> dict[str, AttentionLayer]:
        """Every AttentionLayer made, keyed ``"<component>.<module path>"`` for pipelines."""
        patches = getattr(self._patch, "models", [self._patch])
        layers = {}
        for patch in patches:
            prefix = f"{patch.component}." if getattr(patch, "component", "") else ""
            layers.update({prefix + name: layer for name, layer in patch.layers.items()})
        return layers

    def reset_steps(self) -> None:
        """Start the denoising step count again (a pipeline's scheduler does this on every call)."""
        steps = getattr(self._patch, "steps", None)
        if steps is not None:
            steps.reset()

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
        p, parallel = self.parallel, ""
        if p.sequence_parallel:
            parallel = f", ring_degree={p.ring_degree}, ulysses_degree={p.ulysses_degree}"
        elif p.cp_size > 1:
            parallel = f", cp_size={p.cp_size}"
        return (
            f"AttentionHandle({type(self.obj).__name__}, backend={self.backend!r}{parallel}, {state}, "
            f"{len(self.layers)} layers)"
        )


def _active_handle(obj: Any) -> AttentionHandle | None:
    handle = getattr(obj, "__dict__", {}).get(HANDLE_ATTR)
    return handle if isinstance(handle, AttentionHandle) else None


def _library(obj: Any) -> str:
    """``"diffusers"`` or ``"transformers"``: how ``obj`` gets patched; ``TypeError`` if it cannot be."""
    if is_pipeline(obj):
        return "diffusers"
    family = find_family(obj) if isinstance(obj, torch.nn.Module) else None
    if family is None:
        raise TypeError(
            f"enable_npu_attention does not support {type(obj).__module__}.{type(obj).__name__}; it accepts "
            f"a diffusers pipeline with {supported_pipeline_components()}, or one of these models: "
            f"{supported_models()}"
        )
    return family.library


def _plan(obj: Any, backend, options, platform, strict, groups):
    """(patch, patched models) for ``obj``; raises before changing anything."""
    kwargs = {"platform": platform, "strict": strict}
    if is_pipeline(obj):
        patch = plan_pipeline(obj, backend, options, groups=groups, **kwargs)
        return patch, [p.model for p in patch.models]
    family = find_family(obj)
    if family.library == "diffusers":
        patch = plan_diffusers_model(
            obj, family, backend, options, steps=step_source(), groups=groups, **kwargs
        )
    else:
        patch = plan_transformers_model(obj, family, backend, options, **kwargs)
    return patch, [obj]


def _previous_handles(obj: Any) -> list[AttentionHandle]:
    """The enabled handles on ``obj`` and, for a pipeline, on its transformers."""
    targets = [obj] + ([m for _, m, _ in pipeline_transformers(obj)] if is_pipeline(obj) else [])
    handles = {id(h): h for h in map(_active_handle, targets) if h is not None and h.enabled}
    return list(handles.values())


def check_library(config: ParallelConfig, library: str) -> None:
    """The model's library versus the requested parallelism (needs no process group)."""
    if config.sequence_parallel and library != "diffusers":
        raise ValueError(
            "ring_degree/ulysses_degree split a DiT's token sequence (Wan, Qwen-Image); for causal LLMs "
            "use cp_size=N and attnbridge.parallel_prefill.cp_prefill"
        )
    if config.cp_size > 1 and library != "transformers":
        raise ValueError(
            "cp_size is zigzag context parallelism for causal LLM prefill (Qwen3-MoE); for diffusers "
            "transformers use ring_degree and/or ulysses_degree"
        )


def check_world(config: ParallelConfig, platform: str | None) -> None:
    """Start torch.distributed from a launcher's ``WORLD_SIZE`` if needed; check the world size."""
    if config.world_size == 1:
        return
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and launched_world_size() > 1:
        init_distributed(platform=platform)
        initialized = True
    world = dist.get_world_size() if initialized else 1
    hint = "" if initialized else " (torch.distributed is not initialised: launch with torchrun)"
    config.check_world_size(world, hint)


def enable_npu_attention(
    obj: Any,
    backend: str = "sdpa",
    *,
    strict: bool = False,
    platform: str | None = None,
    ring_degree: int = 1,
    ulysses_degree: int = 1,
    cp_size: int = 1,
    **backend_config: Any,
) -> AttentionHandle:
    """Route every attention call of ``obj`` through ``backend``; returns the handle.

    ``backend_config``: the backend's options (``sparsity=0.75``...); ``platform`` forces a platform's
    kernels; ``strict=True`` makes a missing kernel package an error instead of a logged fallback. An
    enabled object is disabled first; on failure ``obj`` is left as it was. Every rank calls this alike:
    ``ring_degree`` x ``ulysses_degree`` ranks share each DiT token sequence (a ring needs a dense
    backend with the LSE, e.g. ``"fa"``); ``cp_size`` ranks share an LLM prefill
    (:func:`attnbridge.parallel_prefill.cp_prefill`). The product must equal the world size."""
    spec = get_backend(backend)
    if platform is not None:
        get_platform(platform)
    options = spec.parse(backend_config)
    parallel = ParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree, cp_size=cp_size)
    check_library(parallel, _library(obj))
    if parallel.ring_degree > 1:  # before any process group is started
        check_ring_backend(AttentionLayer.with_options(spec.name, options, platform=platform, strict=strict))
    check_world(parallel, platform)
    groups = build_parallel_groups(parallel) if parallel.sequence_parallel else None
    previous = _previous_handles(obj)
    for handle in previous:
        handle.disable()
    try:
        patch, models = _plan(obj, spec, options, platform, strict, groups)
        handle = AttentionHandle(obj, spec.name, patch, models, parallel)
        handle._apply()
    except BaseException:
        for old in previous:
            old._apply()
        raise
    return handle


def disable_npu_attention(obj: Any) -> bool:
    """Restore ``obj``'s original attention, the same objects (``obj``: what was enabled, a model of that
    pipeline, or the handle); returns whether anything was enabled."""
    handle = obj if isinstance(obj, AttentionHandle) else _active_handle(obj)
    if handle is None or not handle.enabled:
        return False
    handle.disable()
    return True


__all__ = ["AttentionHandle", "disable_npu_attention", "enable_npu_attention"]
