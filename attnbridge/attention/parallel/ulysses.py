"""Ulysses: one all-to-all trades a sequence shard of all heads for the whole sequence of a head shard."""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange

from attnbridge.attention.parallel.distributed import group_size


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
