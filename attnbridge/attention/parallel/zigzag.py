"""Zigzag context-parallel layout for causal prefill of a packed batch (tensors packed over dim 0).

Each sequence is cut into ``2 * cp_size`` blocks; rank ``r`` owns blocks ``r`` ("prev") and
``2 * cp_size - 1 - r`` ("next") of every sequence, which balances causal work. Local tokens are
``[s0.b_r, s1.b_r, ..., s0.b_{2cp-1-r}, ...]``: all prev blocks first, so queries split at
``total_q_prev_tokens``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from attnbridge.attention.parallel.distributed import all_gather_rows


def _cumulative(lengths: Sequence[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


def _ranges(starts: Sequence[int], lengths: Sequence[int]) -> list[int]:
    return [i for start, n in zip(starts, lengths) for i in range(start, start + n)]


@dataclass
class ZigzagMetadata:
    """Where every block lives, seen from rank ``cp_rank``. Per block: ``split_list`` (sizes, sequence-major),
    ``zigzag_index`` (this rank's blocks, local order), ``reverse_split_len`` / ``cp_reverse_index`` (pieces
    of the rank-ordered gather stream, and their natural order). Per sequence: ``actual_seq_q_prev/next``
    (query tokens), ``kv_len_prev/next`` (keys each half sees: prefix + blocks ``0..r`` / ``0..2cp-1-r``)."""

    cp_size: int
    cp_rank: int
    seq_lens: list[int]
    prefix_lens: list[int]
    split_list: list[int]
    zigzag_index: list[int]
    reverse_split_len: list[int]
    cp_reverse_index: list[int]
    per_rank_actual_token: list[int]
    max_rank_len: int
    actual_seq_q_prev: list[int]
    actual_seq_q_next: list[int]
    kv_len_prev: list[int]
    kv_len_next: list[int]
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def local_tokens(self) -> int:
        return self.per_rank_actual_token[self.cp_rank]

    @property
    def total_q_prev_tokens(self) -> int:
        """This rank's queries in prev blocks: they come first, the next blocks' after them."""
        return sum(self.actual_seq_q_prev)

    @property
    def kv_starts(self) -> list[int]:
        """Offset of each sequence (its prefix first) in the natural-order packed K/V."""
        return _cumulative([p + n for p, n in zip(self.prefix_lens, self.seq_lens)])[:-1]

    def natural_index(self) -> list[int]:
        """Each natural-order token's row in the gathered buffer (rank ``q`` from ``q * max_rank_len``)."""
        pieces_per_rank = 2 * len(self.seq_lens)
        starts = []
        for q in range(self.cp_size):
            lens = self.reverse_split_len[q * pieces_per_rank : (q + 1) * pieces_per_rank]
            starts += [q * self.max_rank_len + offset for offset in _cumulative(lens)[:-1]]
        order = self.cp_reverse_index
        return _ranges([starts[j] for j in order], [self.reverse_split_len[j] for j in order])

    def index_tensor(self, key: str, device: torch.device) -> torch.Tensor:
        """The ``"natural"`` rows, or the natural K/V rows the ``"kv_prev"`` / ``"kv_next"`` queries see, on
        ``device``; built once for all layers."""
        tensor = self._device_cache.get((key, device))
        if tensor is None:
            kv_lens = self.kv_len_prev if key == "kv_prev" else self.kv_len_next
            rows = self.natural_index() if key == "natural" else _ranges(self.kv_starts, kv_lens)
            tensor = self._device_cache[(key, device)] = torch.tensor(rows, dtype=torch.long, device=device)
        return tensor


def _block_sizes(length: int, blocks: int) -> list[int]:
    base, rem = divmod(length, blocks)
    return [base + 1 if i < rem else base for i in range(blocks)]


def build_zigzag_metadata(
    seq_lens: Sequence[int], cp_rank: int, cp_size: int, prefix_lens: Sequence[int] | None = None
) -> ZigzagMetadata:
    """Layout of ``seq_lens`` new tokens per sequence (each at least ``2 * cp_size``). ``prefix_lens``:
    tokens cached before them (radix-cache hits), which only lengthen the keys."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, cp_size); got cp_rank={cp_rank}, cp_size={cp_size}")
    seq_lens = [int(n) for n in seq_lens]
    if not seq_lens:
        raise ValueError("zigzag context parallelism needs at least one sequence")
    blocks = 2 * cp_size
    if min(seq_lens) < blocks:
        raise ValueError(
            f"zigzag context parallelism with cp_size={cp_size} cuts every sequence into {blocks} "
            f"blocks, so each needs at least {blocks} tokens; got lengths {seq_lens}"
        )
    prefix_lens = [0] * len(seq_lens) if prefix_lens is None else [int(n) for n in prefix_lens]
    if len(prefix_lens) != len(seq_lens) or min(prefix_lens) < 0:
        raise ValueError(f"prefix_lens {prefix_lens} must give one non-negative length per sequence")
    bs, r = len(seq_lens), cp_rank
    block_lens = [_block_sizes(n, blocks) for n in seq_lens]

    def prev_of(q: int) -> list[int]:
        return [b[q] for b in block_lens]

    def next_of(q: int) -> list[int]:
        return [b[blocks - 1 - q] for b in block_lens]

    def stream_piece(seq: int, block: int) -> int:
        """Index of (seq, block) in the all-gather stream [r0 prevs, r0 nexts, r1 prevs, ...]."""
        owner, is_next = (block, 0) if block < cp_size else (blocks - 1 - block, 1)
        return owner * 2 * bs + is_next * bs + seq

    per_rank = [sum(prev_of(q)) + sum(next_of(q)) for q in range(cp_size)]
    return ZigzagMetadata(
        cp_size=cp_size,
        cp_rank=cp_rank,
        seq_lens=seq_lens,
        prefix_lens=prefix_lens,
        split_list=[n for b in block_lens for n in b],
        zigzag_index=list(range(r, bs * blocks, blocks)) + list(range(blocks - 1 - r, bs * blocks, blocks)),
        reverse_split_len=[n for q in range(cp_size) for n in prev_of(q) + next_of(q)],
        cp_reverse_index=[stream_piece(s, b) for s in range(bs) for b in range(blocks)],
        per_rank_actual_token=per_rank,
        max_rank_len=max(per_rank),
        actual_seq_q_prev=prev_of(r),
        actual_seq_q_next=next_of(r),
        kv_len_prev=[p + sum(b[: r + 1]) for p, b in zip(prefix_lens, block_lens)],
        kv_len_next=[p + sum(b[: blocks - r]) for p, b in zip(prefix_lens, block_lens)],
    )


def zigzag_split(x: torch.Tensor, meta: ZigzagMetadata) -> torch.Tensor:
    """This rank's tokens of a natural-order packed tensor (new tokens only), in zigzag order."""
    if x.shape[0] != sum(meta.seq_lens):
        raise ValueError(f"expected {sum(meta.seq_lens)} packed tokens (dim 0); got {x.shape[0]}")
    pieces = torch.split(x, meta.split_list)
    return torch.cat([pieces[i] for i in meta.zigzag_index])


def restore_natural_order(gathered: torch.Tensor, meta: ZigzagMetadata) -> torch.Tensor:
    """Natural order from the gathered buffer (rank ``q``'s tokens at rows ``q * max_rank_len``, padded)."""
    return gathered.index_select(0, meta.index_tensor("natural", gathered.device))


def zigzag_all_gather(
    x_local: torch.Tensor, meta: ZigzagMetadata, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Every rank's zigzag-local tokens in natural order: one gather, padded to ``max_rank_len``."""
    if x_local.shape[0] != meta.local_tokens:
        raise ValueError(f"rank {meta.cp_rank} holds {meta.local_tokens} tokens; got {x_local.shape[0]}")
    if group is None and meta.cp_size > 1:
        group = dist.group.WORLD
    padded = F.pad(x_local, [0, 0] * (x_local.dim() - 1) + [0, meta.max_rank_len - x_local.shape[0]])
    return restore_natural_order(all_gather_rows(padded, group), meta)


def gather_kv(
    k_local: torch.Tensor, v_local: torch.Tensor, meta: ZigzagMetadata, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full K and V of every sequence in natural order, from each rank's local K/V (one gather)."""
    kv = zigzag_all_gather(torch.stack([k_local, v_local], dim=1), meta, group)
    return kv[:, 0], kv[:, 1]
