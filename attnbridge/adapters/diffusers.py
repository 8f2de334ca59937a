"""Patch diffusers transformers (Wan, Qwen-Image): each attention processor is swapped for ours (same
math, kernel call through an :class:`AttentionLayer`); a forward pre-hook fills the call's
:class:`ForwardState`; with sequence parallelism the model also gets its ``_cp_plan``'s hooks."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbridge.adapters.forward_state import ForwardState
from attnbridge.adapters.layers import make_layers
from attnbridge.adapters.qwen_image_processor import QwenImageAttnBridgeProcessor
from attnbridge.adapters.sequence_shards import SequenceShardPatch, plan_sequence_shards
from attnbridge.adapters.steps import step_source
from attnbridge.adapters.wan_processor import WanAttnBridgeProcessor
from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.parallel import ParallelGroups
from attnbridge.attention.parallel.usp import check_heads_divisible
from attnbridge.attention.registry import Backend
from attnbridge.models import FAMILIES, ModelFamily, find_family

PROCESSORS = {"wan": WanAttnBridgeProcessor, "qwen_image": QwenImageAttnBridgeProcessor}


def _bound_inputs(model, signature: inspect.Signature | None, args: tuple, kwargs: dict) -> Mapping[str, Any]:
    """Forward arguments by name, however the caller passed them (pipelines use keywords)."""
    if not args or signature is None:
        return kwargs
    try:
        return signature.bind_partial(model, *args, **kwargs).arguments
    except TypeError:
        return kwargs


def _head_size(module: torch.nn.Module) -> int | None:
    heads, inner = getattr(module, "heads", None), getattr(module, "inner_dim", None)
    return inner // heads if isinstance(heads, int) and isinstance(inner, int) and heads else None


@dataclass
class DiffusersModelPatch:
    """Everything changed on one diffusers transformer, and how to undo it."""

    model: torch.nn.Module
    family: ModelFamily
    state: ForwardState
    steps: Any
    skip_first_steps: int
    layers: dict[str, AttentionLayer]
    #: path -> (module, our processor)
    processors: dict[str, tuple[torch.nn.Module, Any]]
    component: str = ""
    #: path -> the processor found by ``apply`` (restored by ``remove``)
    originals: dict[str, Any] = field(default_factory=dict)
    #: Sequence-parallel split/gather hooks, when enabled with ring/Ulysses degrees.
    sharding: SequenceShardPatch | None = None
    _hooks: list = field(default_factory=list)
    _signature: inspect.Signature | None = None

    def _before_forward(self, module, args, kwargs) -> None:
        inputs = _bound_inputs(module, self._signature, args, kwargs)
        family = self.family
        grid = family.grid_from_inputs(module, inputs) if family.grid_from_inputs else None
        dense_step = False
        if self.skip_first_steps:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "skip_first_steps counts denoising steps on the host, which a compiled transformer "
                    "forward cannot; compile its blocks instead (transformer.compile_repeated_blocks())"
                )
            step = self.steps.observe(inputs.get(family.timestep_arg))
            dense_step = step is not None and step < self.skip_first_steps
        padding = family.text_padding_from_inputs(inputs) if family.text_padding_from_inputs else (None, None)
        self.state.set(grid=grid, dense_step=dense_step, key_lengths=padding[0], kept_text=padding[1])

    def _after_forward(self, module, args, output) -> None:
        self.state.set()

    def apply(self) -> None:
        """Swap the processors in and hook the model; on any failure undo what was done and raise."""
        try:  # the class's: an instance-level wrapper (an offload hook) may hide it
            self._signature = inspect.signature(type(self.model).forward)
        except (TypeError, ValueError):
            self._signature = None
        self.originals = {path: module.get_processor() for path, (module, _) in self.processors.items()}
        try:
            for module, ours in self.processors.values():
                module.set_processor(ours)
            self._hooks = [
                self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                self.model.register_forward_hook(self._after_forward, always_call=True),
            ]
            if self.sharding is not None:  # after the pre-hook above, which must see the full inputs
                self.sharding.apply()
        except BaseException:
            self.remove()
            raise

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
    backend: Backend,
    options: Any,
    *,
    platform: str | None,
    strict: bool,
    steps: Any,
    component: str = "",
    groups: ParallelGroups | None = None,
) -> DiffusersModelPatch:
    """Check the model and build its processors, layers and split/gather hooks, changing nothing yet."""
    sites = family.attention_modules(model)
    for path, module, _ in sites:
        processor = module.get_processor() if hasattr(module, "get_processor") else None
        name = type(processor).__name__
        if name not in family.processor_names:
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
    specs = [(path, site.kind, _head_size(module)) for path, module, site in sites]
    padded = family.text_padding_from_inputs is not None
    layers = make_layers(model, specs, backend, options, platform=platform, strict=strict, padded=padded)
    state = ForwardState()
    sharding = None
    if groups is not None:
        for path, module, _ in sites:
            check_heads_divisible(
                module.heads, groups.config.ulysses_degree, f"{type(model).__name__}.{path}"
            )
        sharding = plan_sequence_shards(model, groups, family.sequence_replicated)
    shards = None if sharding is None else sharding.state
    processor_cls = PROCESSORS[family.name]
    processors = {}
    for path, module, site in sites:
        ours = processor_cls(layers[path], layer_name=path, kind=site.kind, state=state, shards=shards)
        processors[path] = (module, ours)
    skip = getattr(options, "skip_first_steps", 0)
    return DiffusersModelPatch(
        model, family, state, steps, skip, layers, processors, component, sharding=sharding
    )


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
    diffusers = [f for f in FAMILIES if f.library == "diffusers"]
    return ", ".join(
        f"{'/'.join(f.pipeline_components)} of type {'/'.join(f.class_names)}" for f in diffusers
    )


@dataclass
class DiffusersPipelinePatch:
    """The transformer patches of one pipeline, sharing one step count (its scheduler's)."""

    pipe: Any
    models: list[DiffusersModelPatch]
    steps: Any

    def apply(self) -> None:
        try:
            for patch in self.models:
                patch.apply()
        except BaseException:  # the failed patch undid itself; removing one never applied is a no-op
            self.remove()
            raise

    def remove(self) -> None:
        for patch in self.models:
            patch.remove()


def plan_pipeline(
    pipe: Any,
    backend: Backend,
    options: Any,
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
    steps = step_source(pipe)
    kwargs = {"platform": platform, "strict": strict, "steps": steps, "groups": groups}
    models = [
        plan_diffusers_model(model, family, backend, options, component=name, **kwargs)
        for name, model, family in components
    ]
    return DiffusersPipelinePatch(pipe, models, steps)
