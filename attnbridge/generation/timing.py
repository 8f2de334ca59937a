"""Time in attention per backend, kind and layer, through an observer: wall clock on CPU, device events
elsewhere (read at the end). First calls (compilation, warm-up) are reported apart; sparse backends' kept
fraction is measured once per layer, on its second self or joint call, untimed."""

from __future__ import annotations

import functools
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbridge.attention.api import AttentionLayer, observe


def device_module(device: torch.device) -> Any | None:
    """``torch.cuda`` / ``torch.npu`` / ``torch.musa``, ``None`` on CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def synchronize(device: torch.device) -> None:
    module = device_module(device)
    if module is not None and hasattr(module, "synchronize"):
        module.synchronize()


@dataclass
class LayerRecord:
    """Calls of one layer: seconds of its first call and of the rest."""

    backend: str
    kinds: Counter = field(default_factory=Counter)
    calls: int = 0
    first_seconds: float = 0.0
    seconds: float = 0.0
    kept_fraction: float | None = None
    events: list[tuple[Any, Any]] = field(default_factory=list)

    def add(self, seconds: float, first: bool) -> None:
        if first:
            self.first_seconds += seconds
        else:
            self.seconds += seconds

    def resolve_events(self) -> None:
        if self.events:
            self.events[-1][1].synchronize()  # the last call's end event: every earlier one is done too
            for index, (start, end) in enumerate(self.events):
                self.add(start.elapsed_time(end) / 1000.0, first=index == 0)
            self.events = []

    @property
    def kind(self) -> str:
        return self.kinds.most_common(1)[0][0] if self.kinds else "unknown"


class AttentionTimer:
    """Times ``layers`` and counts forward calls of ``models`` while active. ``models`` are keyed by the
    component their layer names start with (``"<component>."``; ``""`` for a bare model)."""

    def __init__(self, layers: dict[str, AttentionLayer], models: dict[str, torch.nn.Module]):
        self.layers = layers
        self.models = models
        self.records = {name: LayerRecord(layer.backend) for name, layer in layers.items()}
        self._by_layer = {id(layer): self.records[name] for name, layer in layers.items()}
        self.forward_calls = dict.fromkeys(models, 0)
        self._hooks: list = []
        self._observing = None

    def _observer(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, context):
        record = self._by_layer.get(id(layer))
        if record is None:
            return None
        kind = context.kind if context is not None else "self"
        record.kinds[kind] += 1
        record.calls += 1
        if kind != "cross" and record.kinds[kind] == 2 and layer.spec.sparse:  # cross calls run dense
            record.kept_fraction = layer.impl_for(q.device).kept_fraction(q, k, context)
        module = device_module(q.device)
        event_cls = getattr(module, "Event", None) if module is not None else None
        if event_cls is None:
            synchronize(q.device)
            start, first = time.perf_counter(), record.calls == 1

            def done(out) -> None:
                synchronize(q.device)
                record.add(time.perf_counter() - start, first)

            return done
        start_event, end_event = event_cls(enable_timing=True), event_cls(enable_timing=True)
        start_event.record()
        record.events.append((start_event, end_event))
        return lambda out: end_event.record()

    def __enter__(self) -> AttentionTimer:
        self._observing = observe(self._observer)
        self._observing.__enter__()
        for key, model in self.models.items():
            self._hooks.append(model.register_forward_pre_hook(functools.partial(self._count, key)))
        return self

    def _count(self, key: str, module, args) -> None:
        self.forward_calls[key] += 1

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._observing.__exit__(*exc)
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
        share = (lambda s: s / pipeline_seconds) if pipeline_seconds > 0 else (lambda s: 0.0)
        records = list(self.records.values())
        groups: dict[tuple[str, str], list[LayerRecord]] = defaultdict(list)
        for record in records:
            groups[(record.backend, record.kind)].append(record)
        rows = []
        for (backend, kind), group in sorted(groups.items()):
            first, steady = sum(r.first_seconds for r in group), sum(r.seconds for r in group)
            kept = [r.kept_fraction for r in group if r.kept_fraction is not None]
            rows.append(
                {
                    "backend": backend,
                    "kind": kind,
                    "layers": len(group),
                    "calls": sum(r.calls for r in group),
                    "first_call_seconds": first,
                    "seconds": steady,
                    "kept_fraction": sum(kept) / len(kept) if kept else None,
                    "fraction_of_pipeline": share(steady + first),
                }
            )
        first, steady = sum(r.first_seconds for r in records), sum(r.seconds for r in records)
        return {
            "pipeline_seconds": pipeline_seconds,
            "attention": {
                "seconds": steady,
                "first_call_seconds": first,
                "calls": sum(r.calls for r in records),
                "layers": len(records),
                "fraction_of_pipeline": share(steady + first),
            },
            "by_backend_kind": rows,
            "forward_calls": dict(self.forward_calls),
            "attention_layers_per_model": self.layers_per_model(),
            "layers": {
                name: {
                    "backend": r.backend,
                    "kind": r.kind,
                    "calls": r.calls,
                    "first_call_seconds": r.first_seconds,
                    "seconds": r.seconds,
                    "kept_fraction": r.kept_fraction,
                }
                for name, r in self.records.items()
            },
        }


def format_summary(summary: dict[str, Any]) -> str:
    """The timing table printed after a run."""
    attention = summary["attention"]
    calls = ", ".join(f"{k or 'model'}={v}" for k, v in summary["forward_calls"].items())
    lines = [
        f"pipeline total   {summary['pipeline_seconds']:9.3f} s   (model forward calls: {calls})",
        f"attention total  {attention['seconds']:9.3f} s   after each layer's first call, "
        f"+ {attention['first_call_seconds']:.3f} s in first calls (compilation, warm-up); "
        f"{100 * attention['fraction_of_pipeline']:.1f}% of the pipeline, {attention['calls']} calls over "
        f"{attention['layers']} layers",
        f"  {'backend':<14}{'kind':<7}{'layers':>7}{'calls':>7}{'first s':>9}{'rest s':>9}{'kept':>7}",
    ]
    for row in summary["by_backend_kind"]:
        kept = "-" if row["kept_fraction"] is None else f"{row['kept_fraction']:.2f}"
        lines.append(
            f"  {row['backend']:<14}{row['kind']:<7}{row['layers']:>7}{row['calls']:>7}"
            f"{row['first_call_seconds']:>9.4f}{row['seconds']:>9.4f}{kept:>7}"
        )
    return "\n".join(lines)
