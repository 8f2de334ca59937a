"""Context-parallel attention on torch.distributed (HCCL on Ascend, NCCL on CUDA, gloo on CPU).

* DiTs (non-causal self-attention): Ulysses x ring over ``ring_degree * ulysses_degree`` ranks, rank
  ``g`` holding chunk ``g`` of the right-padded sequence (:mod:`.config`, :class:`ParallelAttention`,
  :func:`shard_sequence` / :func:`gather_sequence`). Ulysses serves any backend; a ring needs a dense
  one that returns the LSE.
* LLM prefill (causal, packed batch): zigzag over ``cp_size`` ranks (:mod:`.zigzag`, :func:`gather_kv`,
  :func:`zigzag_cp_attention`).
"""

from attnbridge.attention.lse import merge_partials
from attnbridge.attention.parallel.config import ParallelConfig, ParallelGroups, build_parallel_groups
from attnbridge.attention.parallel.cp_fia import zigzag_cp_attention
from attnbridge.attention.parallel.distributed import DistributedInfo, init_distributed
from attnbridge.attention.parallel.sharding import gather_sequence, padded_length, shard_sequence
from attnbridge.attention.parallel.usp import (
    ParallelAttention,
    heads_to_sequence,
    ring_attention,
    sequence_to_heads,
)
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
