"""The one call every model goes through: ``attend(q, k, v, backend=...)``.

A backend is resolved to a platform kernel once per :class:`AttentionLayer` (and once per backend
name for bare ``attend`` calls), never per step.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from attnbridge.attention.contract import (
    AttentionContext,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from attnbridge.attention.registry import BackendSpec, get_backend_spec

PLATFORM_ENV = "ATTNBRIDGE_PLATFORM"


def platform_name_for(device: torch.device, override: str | None = None) -> str:
    """The platform whose kernels run on ``device``; ``override`` or $ATTNBRIDGE_PLATFORM win."""
    from attnbridge.platforms import platform_name_for_device

    return override or os.environ.get(PLATFORM_ENV) or platform_name_for_device(device)


class AttentionLayer:
    """A backend bound to one attention layer: resolves its kernel once per platform and keeps it.

    ``config`` holds the backend options (``sparsity=0.75``, ``skip_first_steps=5``...); it is passed
    to the impl and to the metadata builder of sparse backends.
    """

    def __init__(
        self,
        backend: str = "sdpa",
        *,
        platform: str | None = None,
        strict: bool = False,
        name: str = "",
        **config: Any,
    ) -> None:
        self.spec: BackendSpec = get_backend_spec(backend)
        unknown = sorted(set(config) - set(self.spec.options))
        if unknown:  # a misspelt option must not silently give the default behaviour
            accepted = ", ".join(self.spec.options) or "no options"
            raise ValueError(f"backend {backend!r} does not take option(s) {unknown}; it accepts: {accepted}")
        self.platform = platform
        self.strict = strict
        self.name = name
        self.config = config
        self._impls: dict[str, AttentionImpl] = {}
        self._builder: AttentionMetadataBuilder | None = None

    @property
    def backend(self) -> str:
        return self.spec.name

    def impl_for(self, device: torch.device) -> AttentionImpl:
        """The kernel for ``device``'s platform, resolved on first use and cached."""
        from attnbridge.platforms import get_platform

        platform = platform_name_for(device, self.platform)
        impl = self._impls.get(platform)
        if impl is None:
            impl_cls = get_platform(platform).resolve(self.spec.name, strict=self.strict)
            impl = impl_cls(backend_name=self.spec.name, **self.config)
            self._impls[platform] = impl
        return impl

    def metadata_for(self, impl: AttentionImpl, context: AttentionContext | None):
        if context is None:
            return None
        if self._builder is None:
            self._builder = impl.make_metadata_builder()
        return self._builder.build(context, **self.config)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        return_lse: bool = False,
        metadata: AttentionMetadata | None = None,
        context: AttentionContext | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        impl = self.impl_for(q.device)
        impl.check_inputs(q, k, v, causal=causal, return_lse=return_lse)
        if metadata is None:
            metadata = self.metadata_for(impl, context)
        return impl.forward(
            q, k, v, causal=causal, scale=scale, return_lse=return_lse, metadata=metadata, context=context
        )


@functools.lru_cache(maxsize=64)
def _shared_layer(backend: str, platform: str | None, strict: bool, config: tuple) -> AttentionLayer:
    return AttentionLayer(backend, platform=platform, strict=strict, **dict(config))


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
    metadata: AttentionMetadata | None = None,
    context: AttentionContext | None = None,
    platform: str | None = None,
    strict: bool = False,
    **config: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention on BSHD tensors through ``backend`` (or through ``layer``, which fixes the backend).

    Returns ``out`` ``[B, S_q, H_q, D]`` or, with ``return_lse=True``, ``(out, lse)`` with ``lse``
    ``[B, H_q, S_q]`` float32.
    """
    if layer is None:
        layer = _shared_layer(backend, platform, strict, tuple(sorted(config.items())))
    return layer(
        q, k, v, causal=causal, scale=scale, return_lse=return_lse, metadata=metadata, context=context
    )
