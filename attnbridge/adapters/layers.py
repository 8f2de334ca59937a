"""Making the per-module :class:`AttentionLayer` objects at enable time."""

from __future__ import annotations

import logging
from typing import Any

import torch

from attnbridge.attention.api import AttentionLayer, platform_name_for
from attnbridge.attention.registry import BackendSpec

#: Dense backend used where a sparse backend does not apply (cross-attention to text/image tokens:
#: there is no square token grid to sparsify); the same one the sparse kernels use for their own
#: dense steps, so one model never mixes two dense kernels.
DENSE_FOR_SPARSE = "fa"

logger = logging.getLogger("attnbridge")


def backend_for_kind(spec: BackendSpec, config: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    """The backend and options one attention module of ``kind`` gets."""
    if spec.sparse and kind == "cross":
        return DENSE_FOR_SPARSE, {}
    return spec.name, config


def model_device(model: torch.nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


def check_resolves(layer: AttentionLayer, device: torch.device | None, kinds: set[str]) -> None:
    """Resolve the layer's kernel for ``device`` now, so a missing package (``strict=True``), a bad
    option the impl rejects or an attention kind it cannot serve fails at enable time, before
    anything is patched. Devices no platform serves yet (``meta``) are left to the first call."""
    if device is None:
        return
    try:
        platform_name_for(device, layer.platform)
    except ValueError:
        return
    impl = layer.impl_for(device)
    refused = sorted(kinds - set(impl.attention_kinds))
    if refused:
        raise ValueError(
            f"backend {layer.backend!r} ({impl.kernel}) does not serve {' / '.join(refused)} attention, "
            f"which this model has; it serves: {', '.join(impl.attention_kinds)}"
        )


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
    kinds_by_backend: dict[str, set[str]] = {}
    first_layer: dict[str, AttentionLayer] = {}
    for name, kind in names_and_kinds:
        backend, options = backend_for_kind(spec, config, kind)
        layer = AttentionLayer(backend, platform=platform, strict=strict, name=name, **options)
        kinds_by_backend.setdefault(backend, set()).add(kind)
        first_layer.setdefault(backend, layer)
        layers[name] = layer
    for backend, layer in first_layer.items():
        check_resolves(layer, device, kinds_by_backend[backend])
    if spec.sparse and DENSE_FOR_SPARSE in kinds_by_backend:
        count = sum(1 for _, kind in names_and_kinds if kind == "cross")
        logger.info(
            "backend %r: %d cross-attention layers run dense %r (no token grid to sparsify)",
            spec.name,
            count,
            DENSE_FOR_SPARSE,
        )
    return layers
