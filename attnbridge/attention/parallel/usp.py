"""Unified sequence parallelism: Ulysses all-to-all inside contiguous ranks, ring across them."""

from __future__ import annotations

import torch

from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.contract import AttentionContext, repeat_kv_heads
from attnbridge.attention.parallel.config import ParallelConfig, ParallelGroups, build_parallel_groups
from attnbridge.attention.parallel.ring import ring_attention
from attnbridge.attention.parallel.ulysses import check_heads_divisible, heads_to_sequence, sequence_to_heads
from attnbridge.attention.registry import resolve
from attnbridge.platforms import detect_platform


def check_ring_backend(layer: AttentionLayer) -> None:
    """A ring's hops each attend one key chunk and merge through the LSE: the backend must be dense and
    return the LSE where it runs."""
    if layer.spec.sparse:
        raise ValueError(
            f"ring attention (ring_degree > 1) splits the keys across ranks, so sparse backend "
            f"{layer.backend!r} could select blocks only within one chunk; use ulysses_degree alone with "
            "it (each rank then holds whole sequences for its heads), or a dense backend such as 'fa'"
        )
    platform = layer.platform or detect_platform().name
    try:
        _, impl_cls = resolve(layer.backend, platform, strict=layer.strict)
    except ImportError:
        return  # the backend cannot run here at all; the first call reports that
    if not impl_cls.supports_lse:
        raise ValueError(
            f"ring attention (ring_degree > 1) merges partial results through the softmax LSE, which "
            f"backend {layer.backend!r} does not return on platform {platform!r}: use backend 'fa' "
            "(or ulysses_degree alone with this backend)"
        )


class ParallelAttention:
    """Self-attention over a sequence sharded across ``ring_degree x ulysses_degree`` ranks: made once per
    model (it builds process groups from a config), called with this rank's BSHD chunks."""

    def __init__(
        self, layer: AttentionLayer | str = "fa", parallel: ParallelConfig | ParallelGroups | None = None
    ) -> None:
        self.layer = AttentionLayer(layer) if isinstance(layer, str) else layer
        config = parallel.config if isinstance(parallel, ParallelGroups) else (parallel or ParallelConfig())
        if config.ring_degree > 1:
            check_ring_backend(self.layer)
        self.groups = parallel if isinstance(parallel, ParallelGroups) else build_parallel_groups(config)

    @property
    def config(self) -> ParallelConfig:
        return self.groups.config

    def __call__(
        self,
        q_local: torch.Tensor,
        k_local: torch.Tensor,
        v_local: torch.Tensor,
        *,
        real_len: int | None = None,
        causal: bool = False,
        scale: float | None = None,
        context: AttentionContext | None = None,
    ) -> torch.Tensor:
        """This rank's chunk ``[B, S_local, H, D]`` of a sequence of ``real_len`` real tokens (``None``: no
        padding), the same on every rank. ``context`` reaches the backend only without a ring."""
        self._check(q_local, k_local, v_local, real_len)
        ulysses = self.groups.ulysses_group
        degree = self.config.ulysses_degree
        if degree > 1 and k_local.shape[2] % degree != 0:
            # GQA with fewer kv heads than ranks: give every query head its own kv head first.
            k_local, v_local = repeat_kv_heads(q_local, k_local, v_local)
        q, k, v = self._to_heads(q_local, k_local, v_local, ulysses)
        if self.config.ring_degree > 1:
            ring = self.groups.ring_group
            out = ring_attention(
                q, k, v, layer=self.layer, group=ring, real_len=real_len, causal=causal, scale=scale
            )
        else:
            out = self._full_sequence(q, k, v, real_len, causal, scale, context)
        return heads_to_sequence(out, ulysses)

    def cross(self, q_local: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """Cross-attention of a query shard to keys every rank holds in full (text): no exchange."""
        return self.layer(q_local, k, v, **kwargs)

    def _check(self, q, k, v, real_len) -> None:
        if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
            raise ValueError(
                "ParallelAttention expects self-attention chunks q [B, S_local, H, D] and k, v "
                f"[B, S_local, H_kv, D] of the same length; got {tuple(q.shape)}, {tuple(k.shape)}, "
                f"{tuple(v.shape)} (use .cross() when k/v are the full, replicated sequence)"
            )
        if q.shape[1] == 0:
            raise ValueError("ParallelAttention got an empty sequence chunk; every rank needs tokens")
        check_heads_divisible(q.shape[2], self.config.ulysses_degree)
        total = q.shape[1] * self.config.world_size
        if real_len is not None and not 1 <= real_len <= total:
            raise ValueError(f"real_len={real_len} must be in [1, {total}] (chunk length x ranks)")

    @staticmethod
    def _to_heads(q, k, v, group):
        if group is None:
            return q, k, v
        if q.shape == k.shape:  # one all-to-all for q, k and v together
            q, k, v = sequence_to_heads(torch.cat([q, k, v]), group).chunk(3)
            return q, k, v
        k, v = sequence_to_heads(torch.cat([k, v]), group).chunk(2)
        return sequence_to_heads(q, group), k, v

    def _full_sequence(self, q, k, v, real_len, causal, scale, context):
        """Ulysses only: the kernel sees the whole sequence without its padding (for sparse backends)."""
        if real_len is None or real_len == q.shape[1]:
            return self.layer(q, k, v, causal=causal, scale=scale, context=context)
        out = self.layer(
            q[:, :real_len], k[:, :real_len], v[:, :real_len], causal=causal, scale=scale, context=context
        )
        return torch.cat([out, out.new_zeros(out.shape[0], q.shape[1] - real_len, *out.shape[2:])], dim=1)
