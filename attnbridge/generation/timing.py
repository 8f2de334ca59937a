"""How long a pipeline spends in attention, per backend, attention kind and layer.

Every :class:`AttentionLayer` that ``enable_npu_attention`` made is switched, for the run only, to
:class:`TimedAttentionLayer` (same object, same kernel; the class swap is undone afterwards), and a
forward pre-hook counts the calls of each patched model. On CPU a call is timed with the wall clock;
on accelerators with device events around it, read once at the end, so timing does not force a
synchronisation per call. Attention that bypasses the layers (masked fallbacks) is not counted.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbridge.attention.api import AttentionLayer

_RECORD_ATTR = "_attnbridge_timing"


def device_module(device: torch.device) -> Any | None:
    """``torch.cuda`` / ``torch.npu`` / ``torch.musa`` for an accelerator device, ``None`` on CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def synchronize(device: torch.device) -> None:
    module = device_module(device)
    if module is not None and hasattr(module, "synchronize"):
        module.synchronize()


@dataclass
class LayerRecord:
    """Calls of one layer: wall seconds on CPU, (start, end) event pairs on accelerators."""

    backend: str
    kinds: Counter = field(default_factory=Counter)
    calls: int = 0
    seconds: float = 0.0
    events: list[tuple[Any, Any]] = field(default_factory=list)

    def resolve_events(self) -> None:
        if self.events:
            self.events[-1][1].synchronize()  # the last call's end event: every earlier one is done too
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000.0
            self.events = []

    @property
    def kind(self) -> str:
        return self.kinds.most_common(1)[0][0] if self.kinds else "unknown"


class TimedAttentionLayer(AttentionLayer):
    """An :class:`AttentionLayer` that records each call's time in its :class:`LayerRecord`."""

    def __call__(self, q, k, v, **kwargs):
        record: LayerRecord = self.__dict__[_RECORD_ATTR]
        context = kwargs.get("context")
        record.kinds[context.kind if context is not None else "self"] += 1
        record.calls += 1
        module = device_module(q.device)
        event_cls = getattr(module, "Event", None) if module is not None else None
        if event_cls is None:
            synchronize(q.device)
            start = time.perf_counter()
            out = super().__call__(q, k, v, **kwargs)
            synchronize(q.device)
            record.seconds += time.perf_counter() - start
            return out
        start, end = event_cls(enable_timing=True), event_cls(enable_timing=True)
        start.record()
        out = super().__call__(q, k, v, **kwargs)
        end.record()
        record.events.append((start, end))
        return out


class AttentionTimer:
    """Times ``layers`` (name -> AttentionLayer) and counts forward calls of ``models`` while active.

    Layer names of a pipeline start with ``"<component>."``; each model in ``models`` is keyed by that
    component ("" for a bare model), which is how layers are attributed to models.
    """

    def __init__(self, layers: dict[str, AttentionLayer], models: dict[str, torch.nn.Module]):
        self.layers = layers
        self.models = models
        self.records = {name: LayerRecord(layer.backend) for name, layer in layers.items()}
        self.forward_calls = dict.fromkeys(models, 0)
        self._classes: dict[str, type] = {}
        self._hooks: list = []

    def __enter__(self) -> AttentionTimer:
        for name, layer in self.layers.items():
            self._classes[name] = type(layer)
            layer.__dict__[_RECORD_ATTR] = self.records[name]
            layer.__class__ = TimedAttentionLayer
        for key, model in self.models.items():
            self._hooks.append(model.register_forward_pre_hook(self._counter(key)))
        return self

    def _counter(self, key: str):
        def count(module, args) -> None:
            self.forward_calls[key] += 1

        return count

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, layer in self.layers.items():
            layer.__class__ = self._classes.pop(name)
            layer.__dict__.pop(_RECORD_ATTR, None)
        for record in self.records.values():
            record.resolve_events()

    def layers_per_model(self) -> dict[str, int]:
        counts = dict.fromkeys(self.models, 0)
        for name in self.layers:
            key = next((k for k in self.models if k and name.startswith(f"{k}.")), "")
            if key in counts:
                counts[key] += 1
        return counts

    def summary(self, pipeline_seconds: float) -> dict[str, Any]:
        """Attention time and calls against the pipeline's wall time, as a JSON-ready dict."""
        groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(
            lambda: {"layers": 0, "calls": 0, "seconds": 0.0}
        )
        for record in self.records.values():
            group = groups[(record.backend, record.kind)]
            group["layers"] += 1
            group["calls"] += record.calls
            group["seconds"] += record.seconds
        share = (lambda s: s / pipeline_seconds) if pipeline_seconds > 0 else (lambda s: 0.0)
        attention_seconds = sum(r.seconds for r in self.records.values())
        return {
            "pipeline_seconds": pipeline_seconds,
            "attention": {
                "seconds": attention_seconds,
                "calls": sum(r.calls for r in self.records.values()),
                "layers": len(self.records),
                "fraction_of_pipeline": share(attention_seconds),
            },
            "by_backend_kind": [
                {"backend": backend, "kind": kind, **group, "fraction_of_pipeline": share(group["seconds"])}
                for (backend, kind), group in sorted(groups.items())
            ],
            "forward_calls": dict(self.forward_calls),
            "attention_layers_per_model": self.layers_per_model(),
            "layers": {
                name: {"backend": r.backend, "kind": r.kind, "calls": r.calls, "seconds": r.seconds}
                for name, r in self.records.items()
            },
        }


def format_summary(summary: dict[str, Any]) -> str:
    """The timing table printed after a run."""
    attention = summary["attention"]
    calls = ", ".join(f"{k or 'model'}={v}" for k, v in summary["forward_calls"].items())
    lines = [
        f"pipeline total   {summary['pipeline_seconds']:9.3f} s   (model forward calls: {calls})",
        f"attention total  {attention['seconds']:9.3f} s   {100 * attention['fraction_of_pipeline']:5.1f}% "
        f"of the pipeline, {attention['calls']} calls over {attention['layers']} layers",
        f"  {'backend':<14}{'kind':<7}{'layers':>7}{'calls':>8}{'seconds':>10}{'share':>8}",
    ]
    for row in summary["by_backend_kind"]:
        lines.append(
            f"  {row['backend']:<14}{row['kind']:<7}{row['layers']:>7}{row['calls']:>8}"
            f"{row['seconds']:>10.4f}{100 * row['fraction_of_pipeline']:>7.1f}%"
        )
    return "\n".join(lines)
