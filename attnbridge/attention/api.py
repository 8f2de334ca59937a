"""``attend(q, k, v, backend=...)`` and :class:`AttentionLayer`. Options are checked when a layer is
made, its kernel resolved once per platform; the call path never imports, syncs with the host or reads
per-layer strings, so ``torch.compile`` traces it once per shape however many layers."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from attnbridge.attention.contract import AttentionContext, AttentionImpl, check_key_lengths
from attnbridge.attention.registry import Backend, get_backend, make_impl
from attnbridge.platforms import PLATFORM_ENV, get_platform, platform_name_for_device

_OBSERVERS: list[Callable] = []


def platform_for(device: torch.device, override: str | None = None) -> str:
    """``override``, else ``$ATTNBRIDGE_PLATFORM``, else ``device``'s platform."""
    return override or os.environ.get(PLATFORM_ENV) or platform_name_for_device(device)


@contextlib.contextmanager
def observe(observer: Callable) -> Iterator[None]:
    """Within the block, call ``observer(layer, q, k, context)`` before every eager layer call; what it
    returns, if anything, is called with the output (timing, tests)."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


class AttentionLayer:
    """A backend bound to one attention layer, with its ``options`` (``sparsity=0.75``...); ``platform``
    forces a platform's kernels; ``strict=True`` makes a kernel that cannot run an error, not a fallback."""

    def __init__(
        self,
        backend: str = "sdpa",
        *,
        platform: str | None = None,
        strict: bool = False,
        name: str = "",
        **options: Any,
    ) -> None:
        self.spec: Backend = get_backend(backend)
        platform = platform or os.environ.get(PLATFORM_ENV) or None
        if platform is not None:
            get_platform(platform)
        self.options = self.spec.parse(options)
        self.platform = platform
        self.strict = strict
        self.name = name
        self._impls: dict[str, AttentionImpl] = {}

    @classmethod
    def with_options(cls, backend: str, options: Any, **kwargs: Any) -> AttentionLayer:
        """A layer for options already checked by ``get_backend(backend).parse``."""
        layer = cls(backend, **kwargs)
        layer.options = options
        return layer

    @property
    def backend(self) -> str:
        return self.spec.name

    def platform_for(self, device: torch.device) -> str:
        return platform_for(device, self.platform)

    def impl_for(self, device: torch.device) -> AttentionImpl:
        """The kernel for ``device``, resolved on first use (keyed by device type: constant when compiled)."""
        impl = self._impls.get(device.type)
        if impl is None:
            impl = make_impl(self.spec.name, self.platform_for(device), self.options, strict=self.strict)
            self._impls[device.type] = impl
        return impl

    def __getstate__(self) -> dict[str, Any]:
        # Resolved kernels may hold modules (torch_npu); a loaded copy resolves its own.
        return {**self.__dict__, "_impls": {}}

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        return_lse: bool = False,
        context: AttentionContext | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(q, torch.Tensor):
            raise ValueError(f"backend {self.backend!r} expects q as a torch tensor; got {type(q).__name__}")
        impl = self.impl_for(q.device)
        impl.check_inputs(q, k, v, causal=causal, return_lse=return_lse)
        if context is not None and context.key_lengths is not None:
            check_key_lengths(self.backend, context.key_lengths, q, k)
        if q.shape[1] == 0:  # no queries: nothing to compute, as torch SDPA does
            lse = torch.empty(q.shape[0], q.shape[2], 0, dtype=torch.float32, device=q.device)
            return (torch.empty_like(q), lse) if return_lse else torch.empty_like(q)
        after = []
        if not torch.compiler.is_compiling() and _OBSERVERS:
            after = [a for a in (observer(self, q, k, context) for observer in list(_OBSERVERS)) if a]
        out = impl.forward(q, k, v, causal=causal, scale=scale, return_lse=return_lse, context=context)
        for callback in after:
            callback(out)
        return out


@functools.lru_cache(maxsize=64)
def _shared_layer(backend: str, platform: str | None, strict: bool, options: Any) -> AttentionLayer:
    return AttentionLayer.with_options(backend, options, platform=platform, strict=strict)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "sdpa",
    layer: AttentionLayer | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    context: AttentionContext | None = None,
    platform: str | None = None,
    strict: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention on BSHD tensors through ``backend`` (or ``layer``): ``out`` or ``(out, lse)`` (contract)."""
    if layer is None:
        if platform is not None:
            get_platform(platform)
        layer = _shared_layer(backend, platform, strict, get_backend(backend).parse(options))
    return layer(q, k, v, causal=causal, scale=scale, return_lse=return_lse, context=context)
