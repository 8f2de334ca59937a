"""Checks on ``enable_npu_attention``'s backend and options, done before anything is patched."""

from __future__ import annotations

import numbers
from typing import Any

from attnbridge.attention.registry import BackendSpec, check_sparsity, get_backend_spec

_FRACTION_OPTIONS = ("sparsity", "VSA_sparsity")
_COUNT_OPTIONS = ("skip_first_steps",)


def validate_backend(backend: str, config: dict[str, Any], platform: str | None = None) -> BackendSpec:
    """The backend's spec; ``ValueError`` naming the problem for an unknown backend, platform or option,
    or an option out of range."""
    spec = get_backend_spec(backend)
    if platform is not None:
        from attnbridge.platforms import get_platform

        get_platform(platform)
    unknown = sorted(set(config) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) if spec.options else "no options"
        raise ValueError(f"backend {backend!r} does not take option(s) {unknown}; it accepts: {accepted}")
    for key in _FRACTION_OPTIONS:
        if key in config:
            check_sparsity(backend, config[key], key=key)
    for key in _COUNT_OPTIONS:
        if key in config:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"backend {backend!r}: {key} must be an integer >= 0, got {value!r}")
    return spec
