"""Patch diffusers transformers (Wan, Qwen-Image): our processors in, the originals kept to restore.

For each attention module the family names, the upstream processor is swapped for ours (same
projections, norms and rotary embedding; the kernel call goes through an :class:`AttentionLayer`
made here, once). A forward pre-hook on the transformer reads the token grid and the denoising
step from its inputs into a :class:`ForwardState` its processors share.

With sequence parallelism (``groups`` given) the model also gets the split/gather hooks of its
``_cp_plan`` (:mod:`attnbridge.adapters.sequence_shards`) and processors that attend across ranks.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbridge.adapters.context_parallel import check_heads
from attnbridge.adapters.forward_state import ForwardState
from attnbridge.adapters.layers import make_layers, model_device
from attnbridge.adapters.pipeline_call import PipelineCallPatch
from attnbridge.adapters.qwen_image_processor import QwenImageAttnBridgeProcessor
from attnbridge.adapters.sequence_shards import SequenceShardPatch, plan_sequence_shards
from attnbridge.adapters.steps import StepTracker
from attnbridge.adapters.wan_processor import WanAttnBridgeProcessor
from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.parallel import ParallelGroups
from attnbridge.attention.registry import BackendSpec
from attnbridge.models import FAMILIES, ModelFamily, find_family

PROCESSORS = {"wan": WanAttnBridgeProcessor, "qwen_image": QwenImageAttnBridgeProcessor}


def _forward_signature(model: torch.nn.Module) -> inspect.Signature | None:
    """The class's forward signature (an instance-level wrapper, e.g. an offload hook, may hide it)."""
    try:
        return inspect.signature(type(model).forward)
    except (TypeError, ValueError):
        return None


def _bound_inputs(model, signature: inspect.Signature | None, args: tuple, kwargs: dict) -> Mapping[str, Any]:
    """Forward arguments by name, however the caller passed them (pipelines use keywords)."""
    if not args or signature is None:
        return kwargs
    try:
        return signature.bind_partial(model, *args, **kwargs).arguments
    except TypeError:
        return kwargs


@dataclass
class DiffusersModelPatch:
    """Everything changed on one diffusers transformer, and how to undo it."""

    model: torch.nn.Module
    family: ModelFamily
    state: ForwardState
    tracker: StepTracker
    layers: dict[str, AttentionLayer]
    #: path -> (module, our processor)
    processors: dict[str, tuple[torch.nn.Module, Any]]
    #: path -> the processor that was there when the patch was applied (restored by ``remove``)
    originals: dict[str, Any] = field(default_factory=dict)
    #: Sequence-parallel split/gather hooks, when enabled with ring/Ulysses degrees.
    sharding: SequenceShardPatch | None = None
    _hooks: list = field(default_factory=list)
    _signature: inspect.Signature | None = None

    def _before_forward(self, module, args, kwargs) -> None:
        inputs = _bound_inputs(module, self._signature, args, kwargs)
        grid, extra = (None, {})
        if self.family.grid_from_inputs is not None:
            grid, extra = self.family.grid_from_inputs(module, inputs)
        self.state.grid, self.state.extra = grid, extra
        if self.family.timestep_arg is not None:
            self.state.step = self.tracker.observe(inputs.get(self.family.timestep_arg))
        if self.family.text_mask_arg is not None:
            mask = inputs.get(self.family.text_mask_arg)
            self.state.text_mask_all_valid = None if mask is None else bool(mask.all())

    def _after_forward(self, module, args, output) -> None:
        self.state.text_mask_all_valid = None

    def apply(self) -> None:
        self._signature = _forward_signature(self.model)
        # Originals are read now, not at planning: re-enabling plans while our processors are still in.
        self.originals = {path: module.get_processor() for path, (module, _) in self.processors.items()}
        for module, ours in self.processors.values():
            module.set_processor(ours)
        self._hooks = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward, always_call=True),
        ]
        if self.sharding is not None:  # after the pre-hook above, which must see the full inputs
            self.sharding.apply()

    def remove(self) -> None:
        if self.sharding is not None:
            self.sharding.remove()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for path, original in self.originals.items():
            self.processors[path][0].set_processor(original)
        self.originals = {}


def plan_diffusers_model(
    model: torch.nn.Module,
    family: ModelFamily,
    spec: BackendSpec,
    config: dict[str, Any],
    *,
    platform: str | None,
    strict: bool,
    tracker: StepTracker,
    component: str = "",
    groups: ParallelGroups | None = None,
) -> DiffusersModelPatch:
    """Check the model and build its processors and layers, changing nothing yet; with ``groups``
    (sequence parallelism), also its split/gather hooks."""
    sites = family.attention_modules(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__}: found no attention modules matching "
            f"{[s.pattern for s in family.attention_sites]}; this diffusers version is not supported"
        )
    for path, module, _ in sites:
        processor = module.get_processor() if hasattr(module, "get_processor") else None
        name = type(processor).__name__
        if name not in family.processor_names and not isinstance(processor, PROCESSORS[family.name]):
            raise ValueError(
                f"{type(model).__name__}.{path} uses attention processor {name}, not the upstream "
                f"{' / '.join(family.processor_names)}; attnbridge would drop its behaviour, so it refuses "
                "(restore the default processor first)"
            )
        if getattr(processor, "_parallel_config", None) is not None:
            raise ValueError(
                f"{type(model).__name__}.{path}: diffusers context parallelism is enabled; attnbridge "
                "processors do not support it (disable it first)"
            )
    layers = make_layers(
        [(path, site.kind) for path, _, site in sites],
        spec,
        config,
        platform=platform,
        strict=strict,
        device=model_device(model),
    )
    state = ForwardState(component=component)
    sharding = None
    if groups is not None:
        for path, module, _ in sites:
            check_heads(f"{type(model).__name__}.{path}", module.heads, groups.config.ulysses_degree)
        sharding = plan_sequence_shards(model, groups, family.sequence_replicated)
    shards = None if sharding is None else sharding.state
    processor_cls = PROCESSORS[family.name]
    processors = {
        path: (
            module,
            processor_cls(layers[path], layer_name=path, kind=site.kind, state=state, shards=shards),
        )
        for path, module, site in sites
    }
    return DiffusersModelPatch(model, family, state, tracker, layers, processors, sharding=sharding)


def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline (``DiffusionPipeline``), recognised without importing diffusers."""
    return any(cls.__name__ == "DiffusionPipeline" for cls in type(obj).__mro__) and isinstance(
        getattr(obj, "components", None), dict
    )


def pipeline_transformers(pipe: Any) -> list[tuple[str, torch.nn.Module, ModelFamily]]:
    """``(attribute, model, family)`` for each supported transformer component of ``pipe``."""
    found = []
    for name, component in pipe.components.items():
        family = find_family(component) if isinstance(component, torch.nn.Module) else None
        if family is not None and family.library == "diffusers":
            found.append((name, component, family))
    return found


def supported_pipeline_components() -> str:
    return ", ".join(
        f"{'/'.join(f.pipeline_components)} of type {'/'.join(f.class_names)}"
        for f in FAMILIES
        if f.library == "diffusers"
    )


@dataclass
class DiffusersPipelinePatch:
    """The transformer patches of one pipeline, their shared step counter and the call wrapper."""

    pipe: Any
    models: list[DiffusersModelPatch]
    tracker: StepTracker
    call_patch: PipelineCallPatch

    def apply(self) -> None:
        for patch in self.models:
            patch.apply()
        self.call_patch.apply()

    def remove(self) -> None:
        self.call_patch.remove()
        for patch in self.models:
            patch.remove()


def plan_pipeline(
    pipe: Any,
    spec: BackendSpec,
    config: dict[str, Any],
    *,
    platform: str | None,
    strict: bool,
    groups: ParallelGroups | None = None,
) -> DiffusersPipelinePatch:
    components = pipeline_transformers(pipe)
    if not components:
        names = {k: type(v).__name__ for k, v in pipe.components.items() if v is not None}
        raise TypeError(
            f"{type(pipe).__name__} has no transformer attnbridge supports (components: {names}); "
            f"supported: {supported_pipeline_components()}"
        )
    # Reset on every pipe(...) call; restarting when the timestep rises also covers pipelines made
    # from this one (DiffusionPipeline.from_pipe), whose calls are not wrapped.
    tracker = StepTracker()
    models = [
        plan_diffusers_model(
            model,
            family,
            spec,
            config,
            platform=platform,
            strict=strict,
            tracker=tracker,
            component=name,
            groups=groups,
        )
        for name, model, family in components
    ]
    return DiffusersPipelinePatch(pipe, models, tracker, PipelineCallPatch(pipe, tracker.reset))
