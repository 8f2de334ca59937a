"""What every platform module provides: detection, and the kernel for each requested backend."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import ClassVar

from attnbridge.attention.contract import AttentionImpl
from attnbridge.attention.registry import get_backend_spec
from attnbridge.errors import BackendUnavailableError

logger = logging.getLogger("attnbridge")
#: (platform, backend) pairs whose fallback was already logged: once per process, not once per layer.
_fallbacks_logged: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Kernel:
    """A backend's kernel on one platform: ``"module:Class"`` imported lazily, or why there is none.

    ``fallback`` names the backend used instead when the kernel's package is missing and the user did
    not pass ``strict=True``; that fallback is logged as a warning.
    """

    path: str | None
    unavailable: str | None = None
    fallback: str | None = None


class Platform:
    """One accelerator family. Subclasses fill in ``name``, ``device_type`` and ``kernels``."""

    name: ClassVar[str]
    device_type: ClassVar[str]
    kernels: ClassVar[dict[str, Kernel]]

    @classmethod
    def is_present(cls) -> bool:
        raise NotImplementedError

    @classmethod
    def resolve(cls, backend: str, *, strict: bool = False) -> type[AttentionImpl]:
        """The impl class for ``backend`` here, or :class:`BackendUnavailableError` naming the cause."""
        get_backend_spec(backend)  # unknown names are a ValueError before anything else
        kernel = cls.kernels.get(backend)
        if kernel is None or kernel.path is None:
            reason = kernel.unavailable if kernel else "no kernel is registered"
            raise BackendUnavailableError(backend, cls.name, reason or "no kernel is registered")
        module_name, _, attr = kernel.path.partition(":")
        impl_cls = getattr(importlib.import_module(module_name), attr)
        try:
            impl_cls.check_available(cls.name)
        except BackendUnavailableError:
            if strict or kernel.fallback is None:
                raise
            if (cls.name, backend) not in _fallbacks_logged:
                _fallbacks_logged.add((cls.name, backend))
                logger.warning(
                    "attention backend %r: its package is missing on %s, using %r instead "
                    "(pass strict=True to make this an error)",
                    backend,
                    cls.name,
                    kernel.fallback,
                )
            return cls.resolve(kernel.fallback, strict=True)
        return impl_cls

    @classmethod
    def describe(cls, backend: str) -> str:
        """One line on what ``backend`` runs here, or why it cannot, for ``attnbridge backends``."""
        try:
            impl_cls = cls.resolve(backend, strict=True)
        except BackendUnavailableError as error:
            why = error.reason + (f"; install: {error.install}" if error.install else "")
            fallback = cls.kernels.get(backend, Kernel(None)).fallback
            if fallback is None:
                return f"no: {why}"
            return f"falls back to {fallback!r} ({cls.describe(fallback)}): {why}"
        return f"yes: {impl_cls.kernel}"
