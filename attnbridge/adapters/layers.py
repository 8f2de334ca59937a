"""The per-module :class:`AttentionLayer` objects, made and checked before anything is patched."""

from __future__ import annotations

import logging
from typing import Any

import torch

from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.contract import describe_sizes
from attnbridge.attention.registry import Backend, Unavailable, get_backend, resolve
from attnbridge.platforms import detect_platform

#: Dense backend of cross-attention under a sparse backend (no token grid to sparsify); the sparse
#: kernels' own dense steps use it too, so one model never mixes two dense kernels.
DENSE_FOR_SPARSE = "fa"

logger = logging.getLogger("attnbridge")


def backend_for_kind(backend: Backend, options: Any, kind: str) -> tuple[Backend, Any]:
    """The backend and options one attention module of ``kind`` gets."""
    if backend.sparse and kind == "cross":
        dense = get_backend(DENSE_FOR_SPARSE)
        return dense, dense.options()
    return backend, options


def model_device(model: torch.nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


def check_resolves(
    layer: AttentionLayer, device: torch.device | None, kinds: set[str], head_sizes: set[int]
) -> None:
    """Fail on an attention kind or head size the kernel for ``device`` cannot serve, or on its missing
    package (``strict=True``); devices no platform serves (``meta``) are left to the first call."""
    if device is None:
        return
    try:
        platform = layer.platform_for(device)
    except ValueError:
        return
    entry = layer.spec.entry(platform)
    if not isinstance(entry, Unavailable):
        _check_limits(layer.backend, entry, kinds, head_sizes)
    _check_limits(layer.backend, type(layer.impl_for(device)), kinds, head_sizes)


def _check_limits(backend: str, impl, kinds: set[str], head_sizes: set[int]) -> None:
    refused = sorted(kinds - set(impl.attention_kinds))
    if refused:
        raise ValueError(
            f"backend {backend!r} ({impl.description}) does not serve {' / '.join(refused)} attention, "
            f"which this model has; it serves: {', '.join(impl.attention_kinds)}"
        )
    allowed = impl.supported_head_sizes
    wrong = sorted(h for h in head_sizes if allowed is not None and h not in allowed)
    if wrong:
        raise ValueError(
            f"backend {backend!r} does not support head size {wrong[0]}, which this model has; "
            f"allowed: {describe_sizes(allowed)}"
        )


def _padding_fallback(layer: AttentionLayer, device: torch.device | None) -> str | None:
    """Why padded calls go to a dense fallback on the model's platform or this machine's accelerator."""
    try:
        platforms = [layer.platform_for(device if device is not None else torch.device("cpu"))]
    except ValueError:  # a device no platform serves (meta)
        platforms = []
    if layer.platform is None:
        platforms.append(detect_platform().name)
    for platform in dict.fromkeys(platforms):
        try:
            _, impl_cls = resolve(layer.backend, platform, strict=layer.strict)
        except ImportError:  # a kernel that cannot start here: the first call says why
            continue
        if impl_cls.padding_fallback:
            return impl_cls.padding_fallback
    return None


def resolve_ahead(layer: AttentionLayer, device: torch.device | None) -> None:
    """Resolve the kernels for the model's device and this machine's accelerator (where the model may
    move) now: a call under ``torch.compile`` cannot import or read the registry."""
    for device_type in dict.fromkeys((device.type if device else "cpu", detect_platform().device_type)):
        try:
            layer.impl_for(torch.device(device_type))
        except Exception:  # noqa: BLE001 - a kernel that cannot start here: the first call says why
            continue


def make_layers(
    model: torch.nn.Module,
    sites: list[tuple[str, str, int | None]],
    backend: Backend,
    options: Any,
    *,
    platform: str | None,
    strict: bool,
    padded: bool = False,
) -> dict[str, AttentionLayer]:
    """One layer per attention module ``(path, kind, head size)`` of ``model``, the first of each
    backend checked now. ``padded``: inputs can carry key padding (a kernel that cannot take it says so)."""
    device = model_device(model)
    layers: dict[str, AttentionLayer] = {}
    # served backend -> (its first layer, the kinds it serves, the head sizes it sees)
    served_by: dict[str, tuple[AttentionLayer, set[str], set[int]]] = {}
    for name, kind, head_size in sites:
        served, opts = backend_for_kind(backend, options, kind)
        layer = AttentionLayer.with_options(served.name, opts, platform=platform, strict=strict, name=name)
        _, kinds, heads = served_by.setdefault(served.name, (layer, set(), set()))
        kinds.add(kind)
        if head_size is not None:
            heads.add(head_size)
        layers[name] = layer
    for first, kinds, heads in served_by.values():
        check_resolves(first, device, kinds, heads)
    for layer in layers.values():
        resolve_ahead(layer, device)
    for first, _, _ in served_by.values():
        reason = _padding_fallback(first, device) if padded else None
        if reason:
            logger.warning(
                "backend %r: %s, so calls with padded keys (prompts of different lengths in one batch) "
                "run dense %r",
                first.backend,
                reason,
                DENSE_FOR_SPARSE,
            )
    if backend.sparse and DENSE_FOR_SPARSE in served_by:
        count = sum(1 for _, kind, _ in sites if kind == "cross")
        logger.info(
            "backend %r: %d cross-attention layers run dense %r (no token grid to sparsify)",
            backend.name,
            count,
            DENSE_FOR_SPARSE,
        )
    return layers
