"""Load balance for block-sparse kernels: long rows run as several chunks, merged by their LSE.

A block-sparse kernel gives each query block of each head one thread block (CTA), which walks the
row's whole list of key blocks. The dense rows of a video mask (first frame, text) list every key
block while the others list a few: at Wan 480p and sparsity 0.9 a dense row walks 256 blocks and
a sparse one 14. FlexAttention schedules CTAs query block first, then head, so the dense rows of
the last heads start near the end of the grid and run almost alone (on an H200 that kernel took
1.80 ms where the same number of blocks spread evenly took 1.54 ms). Split, a long row keeps its
first ``chunk`` key blocks in the main call; its other chunks run in a second call over copies of
the row's queries, and the partial results merge exactly through their softmax LSE.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSplit:
    """Index tensors of one split, on the device (built once per shape: building them per call
    would copy from the host and stall the stream)."""

    #: The split query blocks ``[R]``.
    rows: torch.Tensor
    #: Query tokens of the split rows, ``[R * bs]`` (a partial last block repeats its last token).
    row_tokens: torch.Tensor
    #: The extra call's queries: ``row_tokens`` once per extra chunk.
    copy_tokens: torch.Tensor
    #: Which of the ``R * bs`` row positions are real tokens, and those tokens.
    valid: torch.Tensor
    valid_tokens: torch.Tensor
    parts: int


@functools.lru_cache(maxsize=64)
def _plan(rows: tuple[int, ...], seq: int, block_size: int, parts: int, device: str) -> RowSplit:
    row_ids = torch.tensor(rows, dtype=torch.long)
    tokens = (row_ids[:, None] * block_size + torch.arange(block_size)).flatten()
    valid = torch.nonzero(tokens < seq).flatten()
    clamped = tokens.clamp(max=seq - 1)
    return RowSplit(
        rows=row_ids.to(device),
        row_tokens=clamped.to(device),
        copy_tokens=clamped.repeat(parts - 1).to(device),
        valid=valid.to(device),
        valid_tokens=tokens[valid].to(device),
        parts=parts,
    )


@dataclass(frozen=True)
class SplitCalls:
    """The two kernel calls of a split: the main one (all rows, long rows cut to their first
    chunk) and the extra one (the long rows' other chunks, over copies of their queries)."""

    main_counts: torch.Tensor
    extra_q: torch.Tensor
    extra_indices: torch.Tensor
    extra_counts: torch.Tensor
    plan: RowSplit


def split_long_rows(
    q: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    rows: tuple[int, ...],
    chunk: int,
    block_size: int,
) -> SplitCalls | None:
    """Plan the two calls that run each of ``rows`` as chunks of ``chunk`` key blocks.

    ``q`` BSHD; ``kv_indices`` ``[B or 1, H or 1, n_q_blocks, width]``, ``kv_counts`` its counts.
    None when nothing needs splitting. Correct for any lists: a chunk past a row's count is empty
    (its LSE is -inf and it adds nothing).
    """
    width = kv_indices.shape[-1]
    parts = math.ceil(width / chunk)
    if not rows or parts <= 1:
        return None
    plan = _plan(tuple(rows), q.shape[1], block_size, parts, str(q.device))
    indices = kv_indices.to(torch.int32)
    counts = kv_counts.to(torch.int32)
    lead = indices.shape[:2]
    # Chunk p of a row lists entries [p * chunk, (p + 1) * chunk) of the row's list.
    row_lists = torch.nn.functional.pad(indices[:, :, plan.rows], (0, parts * chunk - width))
    chunks = row_lists.view(*lead, len(rows), parts, chunk).transpose(2, 3)  # [b, h, parts, R, chunk]
    starts = torch.arange(parts, device=q.device, dtype=torch.int32)[:, None] * chunk  # [parts, 1]
    chunk_counts = (counts[:, :, plan.rows][:, :, None, :] - starts).clamp(0, chunk)  # [b, h, parts, R]
    return SplitCalls(
        main_counts=counts.index_copy(2, plan.rows, chunk_counts[:, :, 0]),
        extra_q=q.index_select(1, plan.copy_tokens),
        extra_indices=chunks[:, :, 1:].reshape(*lead, -1, chunk).contiguous(),
        extra_counts=chunk_counts[:, :, 1:].reshape(*lead, -1).contiguous(),
        plan=plan,
    )


def merge_row_split(
    out: torch.Tensor, lse: torch.Tensor, extra_out: torch.Tensor, extra_lse: torch.Tensor, plan: RowSplit
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the extra call's chunks into the main call's ``out`` (BSHD) and ``lse`` ``[B, H, S]``;
    returns them. In place (both are the kernel's own outputs) unless autograd records them.

    The chunks' partial outputs come in the kernel's output dtype (bf16 at Wan shapes) and are
    merged in float32, so split rows carry one more bf16 rounding than unsplit ones."""
    merge = _compiled_merge if out.device.type == "cuda" else _merge  # CUDA: one fused kernel
    merged, merged_lse = merge(out, lse, extra_out, extra_lse, plan.row_tokens, plan.valid, plan.parts)
    lse = lse.float()
    if torch.is_grad_enabled() and (out.requires_grad or lse.requires_grad):
        return out.index_copy(1, plan.valid_tokens, merged), lse.index_copy(2, plan.valid_tokens, merged_lse)
    out.index_copy_(1, plan.valid_tokens, merged)
    lse.index_copy_(2, plan.valid_tokens, merged_lse)
    return out, lse


def _merge(out, lse, extra_out, extra_lse, row_tokens, valid, parts: int):
    """The split rows' merged output ``[B, n_valid, H, D]`` (out's dtype) and LSE ``[B, H, n_valid]``."""
    n = row_tokens.numel()
    part_out = torch.cat([out.index_select(1, row_tokens), extra_out], dim=1).float()
    part_out = part_out.unflatten(1, (parts, n))  # [B, parts, n, H, D]
    part_lse = torch.cat([lse.float().index_select(2, row_tokens), extra_lse.float()], dim=2)
    part_lse = part_lse.unflatten(2, (parts, n))  # [B, H, parts, n]
    total = torch.logsumexp(part_lse, dim=2)  # [B, H, n]
    # A row with no key at all has lse -inf in every chunk: weigh from 0 so it stays 0, not NaN.
    reference = torch.where(torch.isneginf(total), torch.zeros_like(total), total)
    weight = torch.exp(part_lse - reference[:, :, None]).permute(0, 2, 3, 1).unsqueeze(-1)
    merged = (part_out * weight).sum(dim=1).index_select(1, valid)
    return merged.to(out.dtype), total.index_select(2, valid)


_compiled_merge = torch.compile(_merge, dynamic=False)
