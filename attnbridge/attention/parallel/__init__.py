"""Context-parallel attention: one sequence spread over several devices.

Two families, both on torch.distributed (HCCL on Ascend, NCCL on CUDA, gloo on CPU):

**Sequence parallelism for DiTs (non-causal self-attention), Ulysses x ring.**
``ring_degree * ulysses_degree`` must equal the world size; Ulysses runs on contiguous ranks and
the ring on strided ones, and rank ``g`` holds chunk ``g`` of the sequence::

    info = init_distributed()                      # torchrun / accelerate env; picks HCCL/NCCL/gloo
    groups = build_parallel_groups(ParallelConfig(ring_degree=2, ulysses_degree=2))  # once, collective
    pattn = ParallelAttention(AttentionLayer("fa"), groups)   # once per model, shared by its layers
    q_local, real_len = shard_sequence(q, groups)  # [B, S, H, D] -> this rank's [B, S_pad/W, H, D]
    k_local, _ = shard_sequence(k, groups)
    v_local, _ = shard_sequence(v, groups)
    out_local = pattn(q_local, k_local, v_local, real_len=real_len)
    out = gather_sequence(out_local, groups, real_len)        # [B, S, H, D] on every rank

* Padding: a length that does not divide the world size (e.g. 32,761 tokens) is right-padded by
  :func:`shard_sequence`; ``real_len`` makes sure no padded token is ever a key (the ring attends
  ``clamp(real_len - src * chunk, 0, chunk)`` keys of chunk ``src``; Ulysses-only cuts the padding
  before the kernel). Outputs at padded rows are garbage and dropped by :func:`gather_sequence`.
  A sequence shorter than the world size is a ``ValueError``.
* Ulysses (:func:`sequence_to_heads` / :func:`heads_to_sequence`, ``all_to_all_single``): query
  heads must divide by ``ulysses_degree`` (``ValueError`` otherwise); kv heads that do not are
  repeated up to the query heads. Any backend works, sparse ones included (``context`` is passed).
* Ring (:func:`ring_attention`): needs a backend that returns the LSE, i.e. ``"fa"``; any other is
  a ``ValueError`` naming ``'fa'``, raised when :class:`ParallelAttention` is built. Partials are
  merged in float32 with :func:`attnbridge.attention.lse.merge_partials`. ``causal=True`` is
  supported (contiguous chunks, so the load is unbalanced; DiTs do not need it).
* Joint attention: shard the whole joint sequence (text tokens included); replicated text tokens
  are not supported. Cross-attention to replicated text K/V needs no exchange:
  ``pattn.cross(q_local, k_text, v_text)``.

**Zigzag context parallelism for LLM prefill (causal, packed varlen batch, e.g. Qwen3-MoE)**::

    meta = build_zigzag_metadata(seq_lens, cp_rank, cp_size)   # every sequence >= 2*cp_size tokens
    x_local = zigzag_split(x_packed, meta)         # hidden states / positions: this rank's tokens
    ...  q_local, k_local, v_local = projections of x_local (TND [tokens, heads, head_dim])
    k, v = gather_kv(k_local, v_local, meta, group)            # natural-order K/V of all sequences
    out_local = zigzag_cp_attention(q_local, k, v, meta)       # FIA TND on Ascend, varlen elsewhere
    out = zigzag_all_gather(out_local, meta, group)            # natural order again (tests, outputs)

``group``'s rank must equal ``cp_rank`` (default: the world). With cached prefixes pass
``prefix_lens`` and K/V laid out per sequence as ``[prefix, new tokens]``.
"""

from attnbridge.attention.lse import merge_partials
from attnbridge.attention.parallel.config import ParallelConfig, ParallelGroups, build_parallel_groups
from attnbridge.attention.parallel.cp_fia import zigzag_cp_attention
from attnbridge.attention.parallel.distributed import COLLECTIVE_BACKENDS, DistributedInfo, init_distributed
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
    "COLLECTIVE_BACKENDS",
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
