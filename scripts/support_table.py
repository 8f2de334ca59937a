"""The support table (backend x model family x attention kind x platform, and why every "no"), derived
from the backend declarations, impl attributes, ``FAMILIES``, the adapters' routing and
``enable_npu_attention``'s refusals; ``scripts/gen_docs.py`` and ``tests/test_matrix.py`` read it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnbridge.adapters.layers import backend_for_kind  # noqa: E402
from attnbridge.adapters.transformers import SPARSE_LM_REFUSAL  # noqa: E402
from attnbridge.attention.contract import describe_sizes, dtype_name  # noqa: E402
from attnbridge.attention.registry import backends, get_backend  # noqa: E402
from attnbridge.errors import BackendUnavailableError  # noqa: E402
from attnbridge.models import FAMILIES, ModelFamily  # noqa: E402
from attnbridge.platforms import PLATFORM_ORDER  # noqa: E402
from attnbridge.support import KernelSupport as _Kernel  # noqa: E402

#: Attention kinds of the contract (``AttentionContext.kind``).
KINDS: tuple[str, ...] = ("self", "cross", "joint")
ALL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

#: Why sparse backends hand cross-attention to a dense backend (the routing itself is derived).
CROSS_IS_DENSE_REASON = (
    "by design: cross-attention keys are text/image-condition tokens, not the latent grid, so there "
    "is no block structure to sparsify"
)


@dataclass(frozen=True)
class Refusal:
    """A "no": error type, reason (a message fragment), stage (``enable`` or ``call``), rule's source."""

    error: type[Exception]
    reason: str
    stage: str
    source: str


def _from_impl(attr: str, default: Any) -> property:
    """A property reading the impl class's ``attr`` (``default`` where there is no impl)."""
    return property(lambda self: default if self.impl is None else getattr(self.impl, attr))


@dataclass(frozen=True)
class KernelSupport(_Kernel):
    """:class:`attnbridge.support.KernelSupport` with the impl's limits, for the tables."""

    @property
    def effective(self) -> KernelSupport:
        """The kernel that actually serves calls here (the fallback's when this one never runs)."""
        return KernelSupport(self.fallback, self.platform) if self.status == "fallback" else self

    impl_name = _from_impl("__name__", "-")
    dtypes = _from_impl("supported_dtypes", ())
    head_sizes = _from_impl("supported_head_sizes", ())
    lse = _from_impl("supports_lse", False)
    causal = _from_impl("supports_causal", False)
    notes = _from_impl("notes", "")

    @property
    def lse_is_dense(self) -> bool:
        """LSE requests are served by the dense ``fa`` kernel instead of this one."""
        kernel = getattr(self.impl, "kernel", None)
        return self.lse and kernel is not None and not kernel.returns_lse

    def refused_dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(d for d in ALL_DTYPES if self.impl is not None and d not in self.dtypes)

    def describe_dtypes(self) -> str:
        return ", ".join(dtype_name(d) for d in self.dtypes) or "-"

    def describe_head_sizes(self) -> str:
        if self.impl is None:
            return "-"
        return "any" if self.head_sizes is None else describe_sizes(self.head_sizes)


@dataclass(frozen=True)
class KindSupport:
    """How the modules of one attention kind of a family are served."""

    kind: str
    served_by: str


@dataclass(frozen=True)
class ModelSupport:
    """``backend`` on ``family`` on ``platform``: the backend of each attention kind, or the refusal."""

    backend: str
    family: ModelFamily
    platform: str
    kinds: tuple[KindSupport, ...]
    refusal: Refusal | None = None

    @property
    def supported(self) -> bool:
        return self.refusal is None

    @property
    def requested(self) -> KernelSupport:
        """The kernel of the backend the user asked for."""
        return KernelSupport(self.backend, self.platform)


def _kind_refusal(served: KernelSupport, kind: str) -> Refusal | None:
    if served.unavailable is not None:
        source = f"derived: the `{served.backend}` declaration"
        return Refusal(BackendUnavailableError, served.unavailable, "enable", source)
    impl = served.effective.impl
    if kind not in impl.attention_kinds:
        source = f"derived: {impl.__name__}.attention_kinds"
        return Refusal(ValueError, f"does not serve {kind} attention", "enable", source)
    return None


def kind_support(backend: str, kind: str, platform: str) -> tuple[str, Refusal | None]:
    """(``yes`` / ``dense`` (another backend serves it) / ``no``, the refusal), for any model family."""
    spec = get_backend(backend)
    served, _ = backend_for_kind(spec, None, kind)
    refusal = _kind_refusal(KernelSupport(served.name, platform), kind)
    if refusal is not None:
        return "no", refusal
    return ("dense" if served.name != backend else "yes"), None


def model_support(backend: str, family: ModelFamily, platform: str) -> ModelSupport:
    """Apply the checks in the order ``enable_npu_attention`` makes them."""
    spec = get_backend(backend)
    kinds = tuple(
        KindSupport(kind, backend_for_kind(spec, None, kind)[0].name)
        for kind in dict.fromkeys(site.kind for site in family.attention_sites)
    )

    def refused(refusal: Refusal) -> ModelSupport:
        return ModelSupport(backend, family, platform, kinds, refusal)

    if spec.sparse and family.library == "transformers":
        source = "stated: block selection needs a latent grid"
        return refused(Refusal(ValueError, SPARSE_LM_REFUSAL, "enable", source))
    for kind in kinds:
        refusal = _kind_refusal(KernelSupport(kind.served_by, platform), kind.kind)
        if refusal is not None:
            return refused(refusal)
    requested = KernelSupport(backend, platform).effective
    if any(site.causal for site in family.attention_sites) and not requested.causal:
        source = f"derived: {requested.impl_name}.supports_causal is False"
        return refused(Refusal(ValueError, "has no causal attention", "enable", source))
    return ModelSupport(backend, family, platform, kinds)


@dataclass(frozen=True)
class SupportTable:
    """Every backend x family x platform entry, and every backend x platform kernel."""

    backends: tuple[str, ...]
    families: tuple[ModelFamily, ...]
    platforms: tuple[str, ...]

    def kernel(self, backend: str, platform: str) -> KernelSupport:
        return KernelSupport(backend, platform)

    def model(self, backend: str, family: ModelFamily | str, platform: str) -> ModelSupport:
        if isinstance(family, str):
            family = next(f for f in self.families if f.name == family)
        return model_support(backend, family, platform)

    def models(self) -> list[ModelSupport]:
        return [self.model(b, f, p) for p in self.platforms for b in self.backends for f in self.families]

    def kernels(self) -> list[KernelSupport]:
        return [self.kernel(b, p) for p in self.platforms for b in self.backends]


def support_table() -> SupportTable:
    """The table over every declared backend, known family and platform."""
    return SupportTable(tuple(backends()), FAMILIES, PLATFORM_ORDER)


__all__ = ["CROSS_IS_DENSE_REASON", "KINDS", "KernelSupport", "SupportTable", "kind_support", "support_table"]
