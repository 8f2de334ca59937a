"""The backend contract every attention kernel in attnbridge implements.

Layout convention, shared by every backend and adapter:

* ``q``: ``[B, S_q, H_q, D]`` (BSHD), ``k`` and ``v``: ``[B, S_kv, H_kv, D]`` with ``H_q % H_kv == 0``.
* output: ``[B, S_q, H_q, D]`` in the dtype of ``q``.
* softmax LSE (when asked for): ``[B, H_q, S_q]`` float32, natural log, so that partial results of
  ring attention can be merged with :func:`attnbridge.attention.lse.merge_partials`.

A *backend* is the user-facing name (``"fa"``, ``"block_sparse"``); an *impl* is the kernel a platform
picked for it; *metadata* is what a sparse backend needs per denoising step, made by its *builder*.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

DENSE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


@dataclass
class AttentionContext:
    """What the adapter knows about one attention call, beyond q/k/v.

    ``kind`` is ``"self"``, ``"cross"`` or ``"joint"`` (text + image tokens in one sequence);
    ``grid`` is the latent token grid ``(T, H, W)`` of the video/image tokens, ``step`` the denoising
    step index, ``num_text_tokens`` how many tokens of a joint sequence are text (they come first).
    """

    kind: str = "self"
    grid: tuple[int, int, int] | None = None
    step: int | None = None
    num_text_tokens: int = 0
    layer_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttentionMetadata:
    """Per-step data a backend reads; dense backends need none of it."""


class AttentionMetadataBuilder:
    """Builds a backend's :class:`AttentionMetadata` once per denoising step (or per shape)."""

    def build(self, context: AttentionContext, **config: Any) -> AttentionMetadata | None:
        return None


class AttentionImpl(ABC):
    """One kernel on one platform. Instances are made once per layer and reused every call."""

    #: Name of the backend this impl serves; the resolver sets it on the instance.
    backend_name: str = ""
    #: Short description of the kernel that actually runs, shown in ``attnbridge backends``.
    kernel: ClassVar[str] = ""
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = DENSE_DTYPES
    #: ``None`` means any head size.
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None
    supports_lse: ClassVar[bool] = True
    supports_causal: ClassVar[bool] = True
    #: Attention kinds (see :class:`AttentionContext`) this kernel serves; the adapters refuse a model
    #: with another kind at enable time, before anything is patched.
    attention_kinds: ClassVar[tuple[str, ...]] = ("self", "cross", "joint")

    @classmethod
    def check_available(cls, platform: str) -> None:
        """Raise :class:`attnbridge.errors.BackendUnavailableError` when a package this kernel needs
        is missing; the platform then errors or falls back, as its table says."""
        return None

    def __init__(self, backend_name: str = "", **config: Any) -> None:
        self.backend_name = backend_name or self.backend_name
        self.config = config

    def check_inputs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, return_lse: bool
    ) -> None:
        """Raise ``ValueError`` naming this backend and the allowed values for input it cannot run."""
        check_qkv(self.backend_name, q, k, v)
        if q.dtype not in self.supported_dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            raise ValueError(
                f"backend {self.backend_name!r} does not support dtype "
                f"{str(q.dtype).removeprefix('torch.')}; allowed: {allowed}"
            )
        head_size = q.shape[-1]
        if self.supported_head_sizes is not None and head_size not in self.supported_head_sizes:
            raise ValueError(
                f"backend {self.backend_name!r} does not support head size {head_size}; "
                f"allowed: {list(self.supported_head_sizes)}"
            )
        if return_lse and not self.supports_lse:
            raise ValueError(
                f"backend {self.backend_name!r} ({self.kernel}) cannot return the softmax LSE; "
                "use backend 'fa'"
            )
        if causal and not self.supports_causal:
            raise ValueError(f"backend {self.backend_name!r} does not support causal attention")

    def make_metadata_builder(self) -> AttentionMetadataBuilder:
        """Sparse impls return their per-step metadata builder; dense ones need none."""
        return AttentionMetadataBuilder()

    @abstractmethod
    def forward(
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
        """Attention on BSHD tensors; returns ``out`` or ``(out, lse)`` (see module docstring)."""


def check_qkv(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape checks shared by every backend, with errors that say what disagrees."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"backend {backend!r} expects q, k, v as 4-D [batch, seq, heads, head_dim] tensors; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"backend {backend!r}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"backend {backend!r}: batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"backend {backend!r}: head_dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"backend {backend!r}: q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})"
        )
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"backend {backend!r}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")


def default_scale(head_size: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_size) if scale is None else float(scale)
