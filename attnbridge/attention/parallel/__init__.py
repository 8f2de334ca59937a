"""Context-parallel attention: one sequence spread over several devices, on torch.distributed
(HCCL on Ascend, NCCL on CUDA, gloo on CPU).

* **DiTs (non-causal self-attention): Ulysses x ring.** ``ring_degree * ulysses_degree`` ranks; the
  Ulysses all-to-all runs between contiguous ranks, the ring between strided ones, and rank ``g``
  holds chunk ``g`` of the sequence, right-padded when the length does not divide the ranks
  (``real_len`` keeps padded tokens from ever being keys). Build the groups once
  (:func:`build_parallel_groups`), wrap a layer in :class:`ParallelAttention`, cut inputs with
  :func:`shard_sequence` and join outputs with :func:`gather_sequence`. Ulysses serves any backend;
  a ring needs a dense one that returns the LSE (partials merge through
  :func:`~attnbridge.attention.lse.merge_partials` in float32).
* **LLM prefill (causal, packed batch of different lengths): zigzag.** Every sequence is cut into
  ``2 * cp_size`` blocks and rank ``r`` keeps blocks ``r`` and ``2 * cp_size - 1 - r``
  (:func:`build_zigzag_metadata`, :func:`zigzag_split`), gathers K/V (:func:`gather_kv`) and runs
  :func:`zigzag_cp_attention` (FIA in TND layout on Ascend, a per-sequence causal loop elsewhere).
"""

from attnbridge.attention.lse import merge_partials
from attnbridge.attention.parallel.config import ParallelConfig, ParallelGroups, build_parallel_groups
from attnbridge.attention.parallel.cp_fia import zigzag_cp_attention
from attnbridge.attention.parallel.distributed import DistributedInfo, init_distributed
from attnbridge.attention.parallel.ring import ring_attention
from attnbridge.attention.parallel.sharding import gather_sequence, padded_length, shard_sequence
from attnbridge.attention.parallel.ulysses import heads_to_sequence, sequence_to_heads
from attnbridge.attention.parallel.usp import ParallelAttention
from attnbridge.attention.parallel.zigzag import (
    ZigzagMetadata,
    build_zigzag_metadata,
    gather_kv,
    restore_natural_order,
    zigzag_all_gather,
    zigzag_split,
)

__all__ = [
    "DistributedInfo",
    "ParallelAttention",
    "ParallelConfig",
    "ParallelGroups",
    "ZigzagMetadata",
    "build_parallel_groups",
    "build_zigzag_metadata",
    "gather_kv",
    "gather_sequence",
    "heads_to_sequence",
    "init_distributed",
    "merge_partials",
    "padded_length",
    "restore_natural_order",
    "ring_attention",
    "sequence_to_heads",
    "shard_sequence",
    "zigzag_all_gather",
    "zigzag_cp_attention",
    "zigzag_split",
]
