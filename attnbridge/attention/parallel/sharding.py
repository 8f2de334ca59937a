"""Cutting a sequence into per-rank chunks and back. It is right-padded to a multiple of the ranks; the
real length travels with the chunks, so padding is never a key, and :func:`gather_sequence` drops it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbridge.attention.parallel.config import ParallelGroups
from attnbridge.attention.parallel.distributed import all_gather_rows


def padded_length(seq_len: int, world_size: int) -> int:
    """The smallest multiple of ``world_size`` that holds ``seq_len`` tokens."""
    if seq_len < world_size:
        raise ValueError(
            f"a sequence of {seq_len} tokens cannot be split over {world_size} sequence-parallel "
            "ranks: every rank needs at least one token"
        )
    return -(-seq_len // world_size) * world_size


def shard_sequence(x: torch.Tensor, groups: ParallelGroups, *, dim: int = 1) -> tuple[torch.Tensor, int]:
    """This rank's chunk of ``x`` along ``dim`` (after right-padding with zeros) and the real length."""
    seq_len = x.shape[dim]
    total = padded_length(seq_len, groups.world_size)
    if total != seq_len:
        pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, total - seq_len]
        x = F.pad(x, pad)
    chunk = total // groups.world_size
    return x.narrow(dim, groups.rank * chunk, chunk), seq_len


def gather_sequence(
    x_local: torch.Tensor, groups: ParallelGroups, real_len: int | None = None, *, dim: int = 1
) -> torch.Tensor:
    """All ranks' chunks concatenated in rank order along ``dim``, cut to ``real_len`` tokens."""
    moved = x_local.movedim(dim, 0)
    full = all_gather_rows(moved, groups.sequence_group).movedim(0, dim)
    return full if real_len is None else full.narrow(dim, 0, real_len)
