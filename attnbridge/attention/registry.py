"""The named backends: each declared once, as ``BACKEND = Backend(...)`` in its own module of
:mod:`attnbridge.attention.backends`, with its options and, per platform, the impl class or
:class:`Unavailable`. The CLI, the support table and the docs read these declarations."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

from attnbridge.attention.contract import AttentionImpl
from attnbridge.attention.options import NoOptions, parse_options
from attnbridge.errors import BackendUnavailableError
from attnbridge.notices import warn_once
from attnbridge.platforms import get_platform


@dataclass(frozen=True)
class Unavailable:
    """No kernel of a backend on a platform, and why; ``install`` when a package would provide one."""

    reason: str
    install: str | None = None


@dataclass(frozen=True)
class Backend:
    """A backend and what runs it on each platform. ``fallback``: the backend that serves (with a logged
    warning) where this one cannot run, unless ``strict=True``. ``order``: its place in listings."""

    name: str
    summary: str
    platforms: Mapping[str, type[AttentionImpl] | Unavailable]
    options: type = NoOptions
    sparse: bool = False
    fallback: str | None = None
    order: int = 100

    def parse(self, given: Mapping[str, Any]) -> Any:
        """The user's options checked into an instance of :attr:`options`."""
        return parse_options(self.name, self.options, given)

    def entry(self, platform: str) -> type[AttentionImpl] | Unavailable:
        return self.platforms.get(platform) or Unavailable("no kernel for this platform")

    def option_help(self) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(self.options)}


@functools.cache
def _declared() -> dict[str, tuple[Backend, ModuleType]]:
    import attnbridge.attention.backends as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        backend = getattr(module, "BACKEND", None)
        if isinstance(backend, Backend):
            found.append((backend, module))
    return {b.name: (b, m) for b, m in sorted(found, key=lambda bm: (bm[0].order, bm[0].name))}


def backends() -> dict[str, Backend]:
    """Every declared backend by name, in listing order."""
    return {name: backend for name, (backend, _) in _declared().items()}


def declaring_module(name: str) -> ModuleType:
    """The module that declares backend ``name`` (its docstring documents the backend)."""
    get_backend(name)
    return _declared()[name][1]


def backend_names(*, sparse: bool | None = None) -> list[str]:
    return [n for n, b in backends().items() if sparse is None or b.sparse == sparse]


def get_backend(name: str) -> Backend:
    """Look a backend up by name; an unknown name is a ValueError listing the known ones."""
    try:
        return backends()[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown attention backend {name!r}; known backends: {', '.join(backends())}"
        ) from None


def kernel_for(name: str, platform: str) -> type[AttentionImpl]:
    """The impl class of backend ``name`` on ``platform`` if it can run here, else the error why."""
    backend = get_backend(name)
    get_platform(platform)
    entry = backend.entry(platform)
    if isinstance(entry, Unavailable):
        raise BackendUnavailableError(name, platform, entry.reason, entry.install)
    try:
        entry.check_available(platform)
    except BackendUnavailableError as error:
        if error.backend == name:
            raise
        raise BackendUnavailableError(name, platform, error.reason, error.install) from error
    return entry


def resolve(name: str, platform: str, *, strict: bool = False) -> tuple[Backend, type[AttentionImpl]]:
    """``(serving backend, impl class)``: ``name`` itself, or its fallback unless ``strict``."""
    backend = get_backend(name)
    try:
        return backend, kernel_for(name, platform)
    except BackendUnavailableError:
        if strict or backend.fallback is None:
            raise
        warn_once(
            f"attention backend {name!r} cannot run on {platform}, using {backend.fallback!r} instead (pass "
            "strict=True to make this an error)"
        )
        return resolve(backend.fallback, platform, strict=True)


def make_impl(name: str, platform: str, options: Any = None, *, strict: bool = False) -> AttentionImpl:
    """An impl of ``name`` on ``platform`` (its fallback's, with default options, where that serves)."""
    served, impl_cls = resolve(name, platform, strict=strict)
    if served.name != name or options is None:
        options = served.options()
    return impl_cls(backend=name, platform=platform, options=options)


class DenseFallbackImpl(AttentionImpl):
    """An impl whose kernel hands the calls it cannot take to the platform's dense ``fa`` kernel
    (:meth:`dense`); inputs are checked against both."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._dense = make_impl("fa", self.platform)

    def check_inputs(self, q, k, v, *, causal, return_lse):
        super().check_inputs(q, k, v, causal=causal, return_lse=return_lse)
        self._dense.check_inputs(q, k, v, causal=causal, return_lse=return_lse)

    def dense(self, q, k, v, **kwargs):
        return self._dense.forward(q, k, v, **kwargs)


__all__ = [
    "Backend",
    "DenseFallbackImpl",
    "Unavailable",
    "backend_names",
    "backends",
    "get_backend",
    "kernel_for",
    "make_impl",
    "resolve",
]
