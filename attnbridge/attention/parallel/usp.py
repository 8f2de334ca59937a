"""Unified sequence parallelism: Ulysses all-to-all inside contiguous ranks, ring across them.

Ulysses: one all-to-all trades a sequence shard of all heads for the whole sequence of a head shard.
Ring: at hop ``s`` rank ``r`` holds the K/V chunk of rank ``(r - s) mod R``; the transfer for hop
``s + 1`` is posted before hop ``s`` computes. Partials merge through their LSE in float32."""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange

from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.contract import AttentionContext, repeat_kv_heads
from attnbridge.attention.lse import merge_partials
from attnbridge.attention.parallel.config import ParallelConfig, ParallelGroups, build_parallel_groups
from attnbridge.attention.parallel.distributed import group_rank, group_size
from attnbridge.attention.registry import resolve
from attnbridge.platforms import detect_platform


def check_heads_divisible(heads: int, degree: int, what: str = "query") -> None:
    if heads % degree != 0:
        raise ValueError(
            f"Ulysses attention splits heads over ulysses_degree={degree} ranks, but the {what} "
            f"head count ({heads}) is not a multiple of it; choose a ulysses_degree dividing {heads}"
        )


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Block ``i`` of dim 0 goes to rank ``i``; block ``i`` of the result came from rank ``i``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[B, S/U, H, D]`` (a sequence shard) -> ``[B, S, H/U, D]`` (a head shard), U = group size."""
    degree = group_size(group)
    if degree == 1:
        return x
    check_heads_divisible(x.shape[2], degree)
    send = rearrange(x, "b s (u h) d -> u b s h d", u=degree)
    received = _all_to_all(send, group)
    return rearrange(received, "u b s h d -> b (u s) h d")


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads`: ``[B, S, H/U, D]`` -> ``[B, S/U, H, D]``."""
    degree = group_size(group)
    if degree == 1:
        return x
    send = rearrange(x, "b (u s) h d -> u b s h d", u=degree)
    received = _all_to_all(send, group)
    return rearrange(received, "u b s h d -> b s (u h) d")


def valid_keys(real_len: int | None, src: int, chunk: int) -> int:
    """Real (non-padding) keys in chunk ``src`` of a sequence of ``real_len`` tokens."""
    if real_len is None:
        return chunk
    return min(max(real_len - src * chunk, 0), chunk)


def _diagonal_partial(layer, q, k, v, *, valid, scale):
    """Causal attention of a chunk to itself when only its first ``valid`` tokens are real."""
    if valid == q.shape[1]:
        return layer(q, k, v, causal=True, scale=scale, return_lse=True)
    out, lse = layer(q[:, :valid], k[:, :valid], v[:, :valid], causal=True, scale=scale, return_lse=True)
    # Padded query rows see no key in this chunk: out 0, lse -inf (merge_partials ignores them).
    pad = q.shape[1] - valid
    out = torch.cat([out, out.new_zeros(out.shape[0], pad, *out.shape[2:])], dim=1)
    lse = torch.cat([lse, lse.new_full((*lse.shape[:2], pad), float("-inf"))], dim=2)
    return out, lse


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layer: AttentionLayer,
    group: dist.ProcessGroup | None,
    real_len: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """This rank's query chunk over the keys of every rank in ``group``. BSHD chunks of length ``C``, rank
    ``i`` holding tokens ``[i*C, (i+1)*C)`` of ``real_len`` real ones. ``causal``: global positions, top-left
    aligned. ``return_lse``: also the float32 LSE ``[B, H, S_q]``, to merge with keys outside the ring
    (replicated text); non-causal queries may then be longer than the key chunk."""
    size, rank = group_size(group), group_rank(group)
    chunk = k.shape[1]
    buffers = [torch.stack([k, v]).contiguous(), None]
    if size > 1:
        buffers[1] = torch.empty_like(buffers[0])
        send_to = dist.get_global_rank(group, (rank + 1) % size)
        recv_from = dist.get_global_rank(group, (rank - 1) % size)
    out = lse = None
    for hop in range(size):
        current = buffers[hop % 2]
        requests = []
        if hop + 1 < size:
            incoming = buffers[(hop + 1) % 2]
            requests = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, current, send_to, group),
                    dist.P2POp(dist.irecv, incoming, recv_from, group),
                ]
            )
        src = (rank - hop) % size
        valid = valid_keys(real_len, src, chunk)
        part = None
        if valid == 0 or (causal and src > rank):
            pass  # only padding, or keys after every query of this rank
        elif causal and src == rank:
            part = _diagonal_partial(layer, q, current[0], current[1], valid=valid, scale=scale)
        else:
            part = layer(q, current[0, :, :valid], current[1, :, :valid], scale=scale, return_lse=True)
        if part is not None:
            out, lse = part if out is None else merge_partials(out, lse, *part)
        for request in requests:
            request.wait()
    if out is None:  # unreachable while real_len >= 1 (chunk 0 always has a real key)
        out = torch.zeros_like(q)
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


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

    def _check(self, q, k, v, real_len) -> None:
        if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
            raise ValueError(
                "ParallelAttention expects self-attention chunks q [B, S_local, H, D] and k, v "
                f"[B, S_local, H_kv, D] of the same length; got {tuple(q.shape)}, {tuple(k.shape)}, "
                f"{tuple(v.shape)} (keys every rank holds in full need no exchange: call the layer itself)"
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
            return sequence_to_heads(torch.cat([q, k, v]), group).chunk(3)
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
