"""The contract every impl (the class running a backend on one platform) implements.

* ``q``: ``[B, S_q, H_q, D]`` (BSHD), ``k`` and ``v``: ``[B, S_kv, H_kv, D]`` with ``H_q % H_kv == 0``.
* output: ``[B, S_q, H_q, D]`` in the dtype of ``q``.
* softmax LSE (when asked for): ``[B, H_q, S_q]`` float32, natural log (ring partials merge through it).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

DENSE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionContext:
    """What the adapter knows about one call. ``kind``: ``"self"``, ``"cross"`` or ``"joint"`` (image
    tokens, then ``num_text_tokens`` text tokens; the queries may hold ``S_q - S_kv`` more text tokens
    after those, text padding in every sample left out of the keys, when the impl
    :meth:`~AttentionImpl.serves_text_tail`); ``grid``: the image tokens' latent grid ``(T, H, W)``;
    ``dense_step``: this denoising step runs dense; ``key_lengths``: valid keys per sample (int ``[B]``,
    the rest is padding); ``gate``: VSA's compress-branch gate (BSHD)."""

    kind: str = "self"
    grid: tuple[int, int, int] | None = None
    step: int | None = None
    dense_step: bool = False
    num_text_tokens: int = 0
    key_lengths: torch.Tensor | None = None
    gate: torch.Tensor | None = None


def describe_sizes(sizes: tuple[int, ...]) -> str:
    """``16, 32, ... 512`` as "multiples of 16 up to 512"; a short list as it is."""
    step = sizes[0] if len(sizes) > 4 else 0
    if step and sizes == tuple(range(step, sizes[-1] + 1, step)):
        return f"multiples of {step} up to {sizes[-1]}"
    return ", ".join(map(str, sizes))


class AttentionImpl(ABC):
    """One kernel on one platform, made per layer; its class attributes (limits) feed checks and docs."""

    #: What actually runs, shown in ``attnbridge backends`` and the docs.
    description: ClassVar[str] = ""
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = DENSE_DTYPES
    #: ``None`` means any head size.
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None
    #: Why calls with key padding run a dense fallback instead (None: it takes them).
    padding_fallback: ClassVar[str | None] = None
    supports_lse: ClassVar[bool] = True
    supports_causal: ClassVar[bool] = True
    #: Attention kinds this kernel serves; a model with another kind is refused at enable time.
    attention_kinds: ClassVar[tuple[str, ...]] = ("self", "cross", "joint")
    #: Install commands of the packages :meth:`check_available` needs.
    install: ClassVar[tuple[str, ...]] = ()
    #: What the attributes above cannot say (shown in the docs).
    notes: ClassVar[str] = ""

    @classmethod
    def check_available(cls, platform: str) -> None:
        """Raise :class:`attnbridge.errors.BackendUnavailableError` when a package it needs is missing."""
        return None

    def __init__(self, *, backend: str, platform: str, options: Any = None) -> None:
        self.backend = backend
        self.platform = platform
        self.options = options

    def serves_text_tail(self, context: AttentionContext) -> bool:
        """Whether a joint call may hold text queries past its keys, in one call: a dense kernel takes
        any query length."""
        return True

    def check_inputs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, return_lse: bool
    ) -> None:
        """Raise ``ValueError`` naming this backend and what is allowed, for input it cannot run."""
        check_qkv(self.backend, q, k, v)
        if q.dtype not in self.supported_dtypes:
            allowed = ", ".join(dtype_name(d) for d in self.supported_dtypes)
            raise ValueError(
                f"backend {self.backend!r} does not support dtype {dtype_name(q.dtype)}; allowed: {allowed}"
            )
        head_size = q.shape[-1]
        if self.supported_head_sizes is not None and head_size not in self.supported_head_sizes:
            raise ValueError(
                f"backend {self.backend!r} does not support head size {head_size}; "
                f"allowed: {describe_sizes(self.supported_head_sizes)}"
            )
        if return_lse and not self.supports_lse:
            raise ValueError(
                f"backend {self.backend!r} ({self.description}) cannot return the softmax LSE; use backend 'fa'"
            )
        if causal and not self.supports_causal:
            raise ValueError(f"backend {self.backend!r} does not support causal attention")

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
        context: AttentionContext | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``out`` or ``(out, lse)`` (see module docstring)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_qkv(backend: str, q: Any, k: Any, v: Any) -> None:
    """Shape checks shared by every backend, with errors that say what disagrees."""
    where = f"backend {backend!r}"
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        kinds = ", ".join(type(x).__name__ for x in (q, k, v))
        raise ValueError(f"{where} expects q, k, v as torch tensors; got {kinds}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{where} expects q, k, v as 4-D [batch, seq, heads, head_dim] tensors; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{where}: batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{where}: head_dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{where}: q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if k.shape[1] == 0:
        raise ValueError(f"{where}: k and v hold no tokens (S_kv = 0): there is nothing to attend")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"{where}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.device != k.device or k.device != v.device:
        raise ValueError(f"{where}: q, k, v are on different devices ({q.device}, {k.device})")


def check_key_lengths(backend: str, key_lengths: Any, q: torch.Tensor, k: torch.Tensor) -> None:
    """``key_lengths``: an integer tensor ``[B]`` on q's device, with values in ``[0, S_kv]`` (0: an empty
    prompt, whose rows get 0). Values are only checked on the CPU: on an accelerator that would sync."""
    where = f"backend {backend!r}: key_lengths"
    if not isinstance(key_lengths, torch.Tensor):
        raise ValueError(
            f"{where} must be a torch tensor of valid keys per sample; got {type(key_lengths).__name__}"
        )
    dtype = key_lengths.dtype
    if key_lengths.shape != (q.shape[0],) or dtype.is_floating_point or dtype == torch.bool:
        raise ValueError(
            f"{where} must be an integer tensor of shape [{q.shape[0]}] (one length per sample); "
            f"got {key_lengths.dtype} {tuple(key_lengths.shape)}"
        )
    if key_lengths.device != q.device:
        raise ValueError(f"{where} is on {key_lengths.device}, q on {q.device}")
    if key_lengths.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(key_lengths.min()), int(key_lengths.max())
        if low < 0 or high > k.shape[1]:
            raise ValueError(f"{where} must lie in [0, {k.shape[1]}] (S_kv); got values in [{low}, {high}]")


def default_scale(head_size: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_size) if scale is None else float(scale)


def repeat_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int = 2):
    """K and V with their heads repeated up to the query heads (for kernels without GQA)."""
    groups = q.shape[head_dim] // k.shape[head_dim]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=head_dim), v.repeat_interleave(groups, dim=head_dim)
