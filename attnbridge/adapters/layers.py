"""Making the per-module :class:`AttentionLayer` objects at enable time."""

from __future__ import annotations

from typing import Any

import torch

from attnbridge.attention.api import AttentionLayer, platform_name_for
from attnbridge.attention.registry import BackendSpec

#: Dense backend used where a sparse backend does not apply (cross-attention to text/image tokens:
#: there is no square token grid to sparsify).
DENSE_FOR_SPARSE = "sdpa"


def backend_for_kind(spec: BackendSpec, config: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    """The backend and options one attention module of ``kind`` gets."""
    if spec.sparse and kind == "cross":
        return DENSE_FOR_SPARSE, {}
    return spec.name, config


def model_device(model: torch.nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


def check_resolves(layer: AttentionLayer, device: torch.device | None) -> None:
    """Resolve the layer's kernel for ``device`` now, so a missing package (``strict=True``) or a bad
    option the impl rejects fails at enable time, before anything is patched. Devices no platform
    serves yet (``meta``) are left to the first call."""
    if device is None:
        return
    try:
        platform_name_for(device, layer.platform)
    except ValueError:
        return
    layer.impl_for(device)


def make_layers(
    names_and_kinds: list[tuple[str, str]],
    spec: BackendSpec,
    config: dict[str, Any],
    *,
    platform: str | None,
    strict: bool,
    device: torch.device | None,
) -> dict[str, AttentionLayer]:
    """One layer per attention module; the first layer of each backend is resolved eagerly."""
    layers: dict[str, AttentionLayer] = {}
    checked: set[str] = set()
    for name, kind in names_and_kinds:
        backend, options = backend_for_kind(spec, config, kind)
        layer = AttentionLayer(backend, platform=platform, strict=strict, name=name, **options)
        if backend not in checked:
            check_resolves(layer, device)
            checked.add(backend)
        layers[name] = layer
    return layers
