"""Splitting a diffusers transformer's token sequence across sequence-parallel ranks where its
``_cp_plan`` says, minus the entries a family keeps replicated. Unlike diffusers' hooks, which need
the length to divide the rank count (Qwen-Image at 1328x1328 has 6,889 image tokens), the sequence is
right-padded, its real length kept in a :class:`ShardState`, and the gather cuts the padding off."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbridge.attention.parallel import ParallelGroups, gather_sequence, shard_sequence


@dataclass
class ShardState:
    """The real (unpadded) length of the sequence split in the current forward call."""

    groups: ParallelGroups
    real_len: int | None = None

    def split(self, x: Any, spec: Any) -> torch.Tensor:
        """``x`` cut along ``spec.split_dim`` if it is a tensor of the layout ``spec`` expects, else as is
        (absent, or not a sequence, such as Wan's per-sample timestep)."""
        if not isinstance(x, torch.Tensor) or spec.expected_dims not in (None, x.dim()):
            return x
        length = x.shape[spec.split_dim]
        if self.real_len is None:
            self.real_len = length
        elif length != self.real_len:
            raise ValueError(
                f"sequence parallelism splits one token sequence per forward; got lengths {self.real_len} "
                f"and {length} (this model's _cp_plan is not supported)"
            )
        local, _ = shard_sequence(x, self.groups, dim=spec.split_dim % x.dim())
        return local.contiguous()

    def gather(self, x: torch.Tensor, spec: Any) -> torch.Tensor:
        if self.real_len is None:
            raise RuntimeError("gathering a sequence that was never split in this forward call")
        return gather_sequence(x, self.groups, self.real_len, dim=spec.gather_dim % x.dim())


def _modules_matching(model: torch.nn.Module, key: str) -> list[torch.nn.Module]:
    """``key`` is a module path from a ``_cp_plan``: ``""`` (the model), ``"blocks.0"``, ``"blocks.*"``."""
    if key == "":
        return [model]
    pattern = re.compile("^" + re.escape(key).replace(r"\*", r"[^.]+") + "$")
    found = [module for path, module in model.named_modules() if pattern.match(path)]
    if not found:
        raise ValueError(f"{type(model).__name__}: _cp_plan names module {key!r}, which does not exist")
    return found


def _split_inputs(state: ShardState, specs: dict[str, Any], module: torch.nn.Module):
    """Forward pre-hook splitting the named tensor inputs, passed by keyword or by position."""
    names = list(inspect.signature(type(module).forward).parameters)[1:]  # without self

    def hook(mod, args, kwargs):
        args = list(args)
        for name, spec in specs.items():
            if name in kwargs:
                kwargs[name] = state.split(kwargs[name], spec)
            elif name in names and names.index(name) < len(args):
                index = names.index(name)
                args[index] = state.split(args[index], spec)
        return tuple(args), kwargs

    return hook


def _map_outputs(specs: dict[int, Any], fn):
    """Forward hook replacing output ``i`` (or the single output) by ``fn(output, specs[i])``."""

    def hook(mod, args, output):
        single = isinstance(output, torch.Tensor)
        items = [output] if single else list(output)
        for index, spec in specs.items():
            items[index] = fn(items[index], spec)
        return items[0] if single else type(output)(items)

    return hook


@dataclass
class SequenceShardPatch:
    """Forward hooks that realise a model's ``_cp_plan`` with padding."""

    model: torch.nn.Module
    state: ShardState
    #: (module, "pre" | "post", hook function) in the order they are registered.
    hooks: list[tuple[torch.nn.Module, str, Any]]
    _handles: list = field(default_factory=list)

    def apply(self) -> None:
        def reset(module, args, kwargs=None):
            self.state.real_len = None

        self._handles = [
            self.model.register_forward_pre_hook(reset, prepend=True),
            self.model.register_forward_hook(lambda m, a, o: reset(m, a), always_call=True),
        ]
        for module, kind, hook in self.hooks:
            if kind == "pre":
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.state.real_len = None


def plan_sequence_shards(
    model: torch.nn.Module, groups: ParallelGroups, replicated: tuple[str, ...] = ()
) -> SequenceShardPatch:
    """The hooks for ``model``'s ``_cp_plan`` minus ``replicated`` entries (``"<module>/<input or output
    index>"``, e.g. ``"pos_embed/1"``); registers nothing yet."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    plan = getattr(type(model), "_cp_plan", None)
    if not plan:
        raise ValueError(
            f"{type(model).__name__} has no _cp_plan in this diffusers version; attnbridge reads where to "
            "split the sequence from it (diffusers >= 0.36 defines it for Wan and Qwen-Image)"
        )
    state = ShardState(groups)
    hooks = []
    for key, entry in plan.items():
        modules = _modules_matching(model, key)
        if isinstance(entry, dict):
            kept = {k: spec for k, spec in entry.items() if f"{key}/{k}" not in replicated}
            if not all(isinstance(spec, ContextParallelInput) for spec in kept.values()):
                raise ValueError(f"{type(model).__name__}._cp_plan[{key!r}]: unsupported entry {kept}")
            inputs = {k: spec for k, spec in kept.items() if not spec.split_output}
            outputs = {k: spec for k, spec in kept.items() if spec.split_output}
            for module in modules:
                if inputs:
                    hooks.append((module, "pre", _split_inputs(state, inputs, module)))
                if outputs:
                    hooks.append((module, "post", _map_outputs(outputs, state.split)))
        else:
            specs = [entry] if isinstance(entry, ContextParallelOutput) else list(entry)
            gathered = {index: spec for index, spec in enumerate(specs) if spec is not None}
            for module in modules:
                hooks.append((module, "post", _map_outputs(gathered, state.gather)))
    return SequenceShardPatch(model, state, hooks)
