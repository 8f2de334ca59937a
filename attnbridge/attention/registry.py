"""The named backends users ask for, independent of the platform that will run them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackendSpec:
    """What a backend name means to the user; platforms decide which kernel serves it."""

    name: str
    sparse: bool
    summary: str
    #: Config keys ``enable_npu_attention(..., **config)`` accepts for this backend.
    options: tuple[str, ...] = ()


_SPARSE_OPTIONS = ("sparsity", "skip_first_steps")

BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("sdpa", False, "torch scaled_dot_product_attention (npu_fusion_attention on Ascend)"),
        BackendSpec("fa", False, "flash attention that can return the softmax LSE (for ring attention)"),
        BackendSpec("sage", False, "SageAttention int8 QK (CUDA/MUSA); falls back to fa unless strict"),
        BackendSpec("laser", False, "Ascend Laser Attention (BNSD, padded to 256); fa elsewhere"),
        BackendSpec("block_sparse", True, "top-k 128-token block-sparse attention", _SPARSE_OPTIONS),
        BackendSpec(
            "rain_fusion", True, "RainFusion adaptive spatial/temporal/textural sparsity", _SPARSE_OPTIONS
        ),
        BackendSpec(
            "vsa",
            True,
            "video sparse attention over 4x4x4 tiles",
            ("sparsity", "VSA_sparsity", "fastvideo_kernel"),
        ),
    )
}


def get_backend_spec(name: str) -> BackendSpec:
    """Look a backend up by name; an unknown name is a ValueError listing the known ones."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown attention backend {name!r}; known backends: {', '.join(BACKENDS)}"
        ) from None


def check_sparsity(backend: str, sparsity: object, *, key: str = "sparsity") -> float:
    """``sparsity`` as a float in ``[0, 1)``; anything else is a ValueError naming the backend.

    The one range check every sparse backend and the adapters' option check share.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"backend {backend!r}: {key} must be a number in [0, 1) (the fraction of attention work "
            f"skipped); got {sparsity!r}"
        )
    return float(sparsity)


_PARTS_PER_MILLION = 1_000_000


def kept_count(sparsity: float, total: int) -> int:
    """``ceil((1 - sparsity) * total)`` clamped to ``[1, total]``, in integer parts per million so
    that float error (``1 - 0.85 = 0.15000000000000002``) cannot keep one block too many."""
    keep_ppm = _PARTS_PER_MILLION - round(sparsity * _PARTS_PER_MILLION)
    return max(1, min(total, -(-keep_ppm * total // _PARTS_PER_MILLION)))


def backend_names(*, sparse: bool | None = None) -> list[str]:
    return [n for n, s in BACKENDS.items() if sparse is None or s.sparse == sparse]
