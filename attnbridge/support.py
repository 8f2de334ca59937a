"""The support table: which backend serves which model family, attention kind, platform, dtype and
head size, and the reason for every "no".

Most of it is *derived* from the sources of truth, so it cannot drift from them:

* kernels, fallbacks and "no kernel here" reasons: the platform tables (``attnbridge/platforms``);
* dtypes, head sizes, LSE and causal support: the impl class attributes;
* families, their attention kinds and causality: ``attnbridge.models.FAMILIES``;
* which backend a module of each kind gets (sparse backends serve cross-attention with a dense one):
  ``attnbridge.adapters.layers.backend_for_kind``;
* options: ``attnbridge.attention.registry.BACKENDS``.

What lives nowhere else in code is *stated* here, each with its reason: refusals that are only an
error message (:data:`STATED_REFUSALS`), install commands per kernel (:data:`INSTALL`), what each
option means (:data:`OPTION_HELP`) and which platform ran on real hardware (:data:`PLATFORM_FACTS`).
``tests/test_matrix.py`` runs every stated refusal and install hint against the code, so a stated
fact that stops being true fails a test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property

import torch

from attnbridge.adapters.layers import backend_for_kind
from attnbridge.attention.backends.sage import SAGE_INSTALL
from attnbridge.attention.contract import AttentionImpl
from attnbridge.attention.registry import BACKENDS
from attnbridge.errors import BackendUnavailableError
from attnbridge.models import FAMILIES, ModelFamily
from attnbridge.platforms import PLATFORMS
from attnbridge.platforms.base import Kernel
from attnbridge.platforms.npu import ATTENTIONS_INSTALL, TORCH_NPU_INSTALL

#: Column order of every table: the platform that always runs first, then the accelerators.
PLATFORM_ORDER: tuple[str, ...] = ("cpu", "npu", "cuda", "musa")
#: Attention kinds of the contract (``AttentionContext.kind``).
KINDS: tuple[str, ...] = ("self", "cross", "joint")
ALL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Stated facts (nowhere else in code)


@dataclass(frozen=True)
class PlatformFacts:
    """Where a platform's code paths ran, and how ``attnbridge matrix`` runs them on a machine
    without that hardware (``mode``: ``native``, ``emulated`` or ``device``)."""

    name: str
    evidence: str
    mode: str
    not_run: str = ""
    #: Whether its paths ran on real hardware of that platform (not only an emulation, or nothing).
    ran_on_hardware: bool = False


PLATFORM_FACTS: dict[str, PlatformFacts] = {
    f.name: f
    for f in (
        PlatformFacts(
            "cpu",
            "runs on every machine: `make matrix` and the test suite run every CPU path in CI",
            "native",
            ran_on_hardware=True,
        ),
        PlatformFacts(
            "npu",
            "never ran on Ascend hardware: the NPU paths call the documented torch_npu / sgl-kernel-npu "
            "ops and ran only against the CPU emulation of those ops in `tests/emulation/`",
            "emulated",
            "not run: the NPU emulation (tests/emulation) is not importable; run from the repository root",
        ),
        PlatformFacts(
            "cuda",
            "ran on an NVIDIA H200 through the device tool: `scripts/check_gpu_kernels.py` checked `sdpa` "
            "and `fa` (with and without LSE) against a float32 reference, the CUDA-only tests of "
            "`block_sparse` and `vsa` passed there, and `scripts/bench_*.py` timed `fa`, `sdpa`, "
            "`block_sparse`, `rain_fusion`, `vsa` and whole Wan steps (docs/benchmarks.md); ring, Ulysses "
            "and ring x Ulysses Wan steps ran over NCCL on 2 and 4 H200s and matched the 1-GPU step. Not run on "
            "the GPU: the `sage` kernel itself (sageattention is not on the GPU image, so its logged `fa` "
            "fallback ran) and `laser`'s CUDA path (`fa` with Laser's padding)",
            "device",
            "not run here: needs the GPU (see 'Where each platform ran')",
            ran_on_hardware=True,
        ),
        PlatformFacts(
            "musa",
            "never ran: no MUSA hardware was available; the MUSA paths are untested",
            "device",
            "not run: no MUSA hardware",
        ),
    )
}

#: Packages a kernel needs, as the install commands its ``BackendUnavailableError`` names, in the
#: order its ``check_available`` imports them. Kernels not listed need only torch.
INSTALL: dict[str, tuple[str, ...]] = {
    "NpuFusionAttentionImpl": (TORCH_NPU_INSTALL,),
    "NpuFIAImpl": (TORCH_NPU_INSTALL,),
    "NpuLaserImpl": (TORCH_NPU_INSTALL, ATTENTIONS_INSTALL),
    "NpuBlockSparseImpl": (TORCH_NPU_INSTALL, ATTENTIONS_INSTALL),
    "NpuRainFusionImpl": (TORCH_NPU_INSTALL,),
    "SageImpl": (SAGE_INSTALL,),
}

#: Packages a kernel uses when present but does not need, keyed (kernel, platform).
OPTIONAL_PACKAGES: dict[tuple[str, str], str] = {
    ("NpuRainFusionImpl", "npu"): (
        f"sgl-kernel-npu's `rainfusionattention` when torch_npu has no `npu_block_sparse_attention` "
        f"(`{ATTENTIONS_INSTALL.split(' (')[0]}`)"
    ),
    ("FlexVSAImpl", "cuda"): "FastVideo's fused `vsa` kernel with `fastvideo_kernel=True` (needs CUDA 12)",
}

#: Notes on a kernel that its class attributes cannot express.
KERNEL_NOTES: dict[str, str] = {
    "SageImpl": "LSE only where the installed sageattention's `sageattn` takes `return_lse`",
    "NpuLaserImpl": (
        "unavailable on Ascend 950 (A5); calls that are causal, cross, ask for the LSE, have head_dim "
        "> 128 or fewer than 2048 tokens run dense FIA"
    ),
    "LaserReferenceImpl": "the Laser contract on the dense `fa` kernel (same fallbacks, fp16 cast, padding)",
    "NpuBlockSparseImpl": "LSE requests run dense FIA (the kernel returns none)",
    "NpuRainFusionImpl": "LSE requests run dense FIA (the kernel returns none)",
}

#: What each backend option means (every option in ``BACKENDS`` must have an entry).
OPTION_HELP: dict[str, str] = {
    "sparsity": "fraction of key blocks (tiles for vsa) each query block skips, in [0, 1); default 0",
    "skip_first_steps": "denoising steps run dense before sparsity starts, integer >= 0; default 0",
    "VSA_sparsity": "sglang's name for vsa's `sparsity`; wins over `sparsity` when both are given",
    "fastvideo_kernel": (
        "True: run FastVideo's fused `vsa` kernel instead of the FlexAttention path where it imports "
        "(CUDA, default scale only); default False"
    ),
}


@dataclass(frozen=True)
class Refusal:
    """A documented "no": the error raised, a fragment of its message (the reason), and when it is
    raised (``enable``: by ``enable_npu_attention``; ``call``: on the first attention call)."""

    error: type[Exception]
    reason: str
    stage: str
    source: str


#: Refusals that exist only as an error message in code, keyed (backend or "sparse", family library
#: or attention kind). ``tests/test_matrix.py`` triggers each one on a real tiny model.
STATED_REFUSALS: dict[tuple[str, str], Refusal] = {
    ("sparse", "transformers"): Refusal(
        ValueError,
        "is a sparse video/image backend (it needs a latent token grid)",
        "enable",
        "stated: sparse selection needs a latent grid; a causal LM has none",
    ),
    ("vsa", "joint"): Refusal(
        ValueError,
        "does not serve joint attention",
        "enable",
        "stated: VSA tiles video tokens, a joint sequence carries text tokens (FlexVSAImpl.attention_kinds)",
    ),
}

#: Why sparse backends hand cross-attention to a dense backend (the routing itself is derived).
CROSS_IS_DENSE_REASON = (
    "by design: cross-attention keys are text/image-condition tokens, not the latent grid, so there "
    "is no block structure to sparsify"
)


# ----------------------------------------------------------------------------------------------
# Derived: one backend on one platform


def _import_impl(path: str) -> type[AttentionImpl]:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KernelSupport:
    """What ``backend`` runs on ``platform``, read from the platform table and the impl class."""

    backend: str
    platform: str
    kernel: Kernel

    @property
    def unavailable(self) -> str | None:
        """Why the platform has no kernel for this backend (``None``: it has one)."""
        if self.kernel.path is None:
            return self.kernel.unavailable or "no kernel is registered"
        return None

    @cached_property
    def impl(self) -> type[AttentionImpl] | None:
        return None if self.kernel.path is None else _import_impl(self.kernel.path)

    @cached_property
    def never_runs(self) -> str | None:
        """Reason the kernel can never run here whatever is installed (its ``check_available``
        refuses without naming a package to install), so the table's fallback always serves."""
        if self.impl is None:
            return None
        try:
            self.impl.check_available(self.platform)
        except BackendUnavailableError as error:
            return None if error.install else error.reason
        return None

    @property
    def status(self) -> str:
        """``yes``, ``fallback`` (another backend always serves it here) or ``no``."""
        if self.unavailable is not None:
            return "no"
        return "fallback" if self.never_runs and self.kernel.fallback else "yes"

    @property
    def effective(self) -> KernelSupport:
        """The kernel that actually serves calls here (the fallback's when this one never runs)."""
        if self.status == "fallback":
            return kernel_support(self.kernel.fallback, self.platform)
        return self

    @property
    def impl_name(self) -> str:
        return self.impl.__name__ if self.impl is not None else "-"

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return self.impl.supported_dtypes if self.impl is not None else ()

    @property
    def head_sizes(self) -> tuple[int, ...] | None:
        return self.impl.supported_head_sizes if self.impl is not None else ()

    @property
    def lse(self) -> bool:
        return bool(self.impl is not None and self.impl.supports_lse)

    @property
    def lse_is_dense(self) -> bool:
        """LSE requests are served by the dense ``fa`` kernel instead of this one."""
        return self.lse and getattr(self.impl, "sparse_lse", True) is False

    @property
    def causal(self) -> bool:
        return bool(self.impl is not None and self.impl.supports_causal)

    @property
    def install(self) -> tuple[str, ...]:
        return INSTALL.get(self.impl_name, ())

    def refused_dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(d for d in ALL_DTYPES if self.impl is not None and d not in self.dtypes)

    def describe_dtypes(self) -> str:
        return ", ".join(_dtype_name(d) for d in self.dtypes) or "-"

    def describe_head_sizes(self) -> str:
        if self.impl is None:
            return "-"
        return "any" if self.head_sizes is None else ", ".join(map(str, self.head_sizes))


def kernel_support(backend: str, platform: str) -> KernelSupport:
    """The table entry of ``backend`` on ``platform``; unknown names are a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    kernels = PLATFORMS[platform].kernels
    return KernelSupport(backend, platform, kernels.get(backend, Kernel(None, "no kernel is registered")))


# ----------------------------------------------------------------------------------------------
# Derived: one backend on one model family on one platform


@dataclass(frozen=True)
class KindSupport:
    """How the modules of one attention kind of a family are served."""

    kind: str
    served_by: str
    note: str = ""


@dataclass(frozen=True)
class ModelSupport:
    """``backend`` on ``family`` on ``platform``: the backend each attention kind gets, or the refusal
    ``enable_npu_attention`` (stage ``enable``) or the first attention call (``call``) raises."""

    backend: str
    family: ModelFamily
    platform: str
    kinds: tuple[KindSupport, ...]
    refusal: Refusal | None = None
    kernels: dict[str, KernelSupport] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return self.refusal is None

    @property
    def main(self) -> KernelSupport:
        """The kernel of the backend the user asked for."""
        return self.kernels[self.backend]


def family_kinds(family: ModelFamily) -> tuple[str, ...]:
    """The attention kinds of ``family``, in site order, each once."""
    return tuple(dict.fromkeys(site.kind for site in family.attention_sites))


def model_support(backend: str, family: ModelFamily, platform: str) -> ModelSupport:
    """Apply the checks in the order ``enable_npu_attention`` and the first call make them."""
    spec = BACKENDS[backend]
    kinds = []
    for kind in family_kinds(family):
        served, _ = backend_for_kind(spec, {}, kind)
        kinds.append(KindSupport(kind, served, CROSS_IS_DENSE_REASON if served != backend else ""))
    kernels = {k.served_by: kernel_support(k.served_by, platform) for k in kinds}
    kernels.setdefault(backend, kernel_support(backend, platform))

    def refused(refusal: Refusal) -> ModelSupport:
        return ModelSupport(backend, family, platform, tuple(kinds), refusal, kernels)

    if spec.sparse and ("sparse", family.library) in STATED_REFUSALS:
        return refused(STATED_REFUSALS[("sparse", family.library)])
    for served in dict.fromkeys(k.served_by for k in kinds):
        if kernels[served].unavailable is not None:
            return refused(_no_kernel(served, platform, kernels[served].unavailable))
    if any(site.causal for site in family.attention_sites) and not kernels[backend].effective.causal:
        return refused(
            Refusal(
                ValueError,
                "has no causal attention",
                "enable",
                f"derived: {kernels[backend].effective.impl_name}.supports_causal is False",
            )
        )
    for kind in kinds:
        refusal = STATED_REFUSALS.get((kind.served_by, kind.kind))
        if refusal is not None:
            return refused(refusal)
    return ModelSupport(backend, family, platform, tuple(kinds), None, kernels)


def kind_support(backend: str, kind: str, platform: str) -> tuple[str, Refusal | None]:
    """(``yes`` / ``dense`` / ``no``, the refusal) for ``backend`` on attention ``kind`` on
    ``platform``, independent of a model family; ``dense`` means another backend serves that kind."""
    spec = BACKENDS[backend]
    served, _ = backend_for_kind(spec, {}, kind)
    kernel = kernel_support(served, platform)
    if kernel.unavailable:
        return "no", _no_kernel(served, platform, kernel.unavailable)
    refusal = STATED_REFUSALS.get((served, kind))
    if refusal is not None:
        return "no", refusal
    return ("dense" if served != backend else "yes"), None


def _no_kernel(backend: str, platform: str, reason: str) -> Refusal:
    return Refusal(
        BackendUnavailableError, reason, "enable", f"derived: attnbridge/platforms/{platform}.py table"
    )


@dataclass(frozen=True)
class SupportTable:
    """Every backend x family x platform entry, and every backend x platform kernel."""

    backends: tuple[str, ...]
    families: tuple[ModelFamily, ...]
    platforms: tuple[str, ...]

    def kernel(self, backend: str, platform: str) -> KernelSupport:
        return kernel_support(backend, platform)

    def model(self, backend: str, family: ModelFamily | str, platform: str) -> ModelSupport:
        if isinstance(family, str):
            family = next(f for f in self.families if f.name == family)
        return model_support(backend, family, platform)

    def models(self) -> list[ModelSupport]:
        return [self.model(b, f, p) for p in self.platforms for b in self.backends for f in self.families]

    def kernels(self) -> list[KernelSupport]:
        return [self.kernel(b, p) for p in self.platforms for b in self.backends]


def support_table() -> SupportTable:
    """The table over every registered backend, known family and platform."""
    platforms = tuple(p for p in PLATFORM_ORDER if p in PLATFORMS) + tuple(
        p for p in PLATFORMS if p not in PLATFORM_ORDER
    )
    return SupportTable(tuple(BACKENDS), FAMILIES, platforms)


__all__ = [
    "INSTALL",
    "KINDS",
    "OPTION_HELP",
    "PLATFORM_FACTS",
    "STATED_REFUSALS",
    "KernelSupport",
    "ModelSupport",
    "Refusal",
    "SupportTable",
    "kernel_support",
    "kind_support",
    "model_support",
    "support_table",
]
