"""Which key blocks each query block attends: pooled scores, top-k, thresholds, mask <-> index lists.

Everything is tensor code without Python loops over blocks, so selection stays a few small kernels
next to the attention itself (pooling reads q and k once; the rest works on ``[B, H, nb, nb]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnbridge.attention.options import kept_count


@dataclass(frozen=True)
class BlockSelection:
    """Kept key blocks per query block, as index lists (what FlexAttention takes).

    ``indices`` int32 ``[B, H, nq, nk]``: the first ``counts`` entries of a row are its kept key
    blocks in ascending order; later entries are ignored. ``counts`` int32 ``[B, H, nq]``.
    """

    indices: torch.Tensor
    counts: torch.Tensor
    num_kv_blocks: int
    #: The same selection as a bool mask, when the selector made one (saves rebuilding it).
    kept_mask: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        """Bool ``[B, H, nq, nk]``, True where a block is kept (what the Ascend kernels take)."""
        if self.kept_mask is not None:
            return self.kept_mask
        return indices_to_mask(self.indices, self.counts, self.num_kv_blocks)


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of BSHD ``x`` over each block of ``block_size`` tokens -> float32 ``[B, nb, H, D]``.

    A partial tail block is the mean of the tokens it has, so it is not diluted by padding.
    """
    batch, seq, heads, dim = x.shape
    full = seq // block_size
    parts = []
    if full:
        body = x[:, : full * block_size].reshape(batch, full, block_size, heads, dim)
        parts.append(body.mean(dim=2, dtype=torch.float32))
    if seq > full * block_size:
        parts.append(x[:, full * block_size :].mean(dim=1, keepdim=True, dtype=torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def pooled_scores(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, key_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Block-level attention logits ``q̄ · k̄ᵀ · scale`` per head: float32 ``[B, H_q, nq, nk]``.

    With ``key_lengths`` (valid keys per sample) a key block holding no valid key scores -inf, so
    no selection spends its budget on padding.
    """
    q_bar = pool_blocks(q, block_size).transpose(1, 2)  # [B, Hq, nq, D]
    k_bar = pool_blocks(k, block_size).transpose(1, 2)  # [B, Hkv, nk, D]
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k_bar = k_bar.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q_bar, k_bar.transpose(-1, -2)) * scale
    if key_lengths is not None:
        starts = torch.arange(scores.shape[-1], device=q.device) * block_size
        padding = starts[None, :] >= key_lengths[:, None]  # [B, nk]
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return scores


def select_top_blocks(
    scores: torch.Tensor, sparsity: float, dense_blocks: torch.Tensor, num_dense: int
) -> BlockSelection:
    """Top-scoring key blocks per query block and head, always with the forced ones.

    ``dense_blocks`` bool ``[nb]`` marks the ``num_dense`` blocks that are dense rows and dense
    columns (first frame, text); the diagonal is forced too. ``sparsity`` is the fraction of the
    ``nq x nk`` block pairs skipped per head: the dense rows and the forced columns are paid from
    that budget, and the rest is spread evenly over the other rows, each keeping its best
    ``keep`` blocks (never fewer than its forced ones). So the work is ``1 - sparsity`` of dense
    attention, whatever the first frame costs.
    """
    batch, heads, nq, nk = scores.shape
    device = scores.device
    keep = row_budget(sparsity, nq, nk, num_dense)
    if keep == nk:
        return dense_selection(batch, heads, nq, nk, device)
    cols = torch.arange(nk, device=device)
    rows = torch.arange(nq, device=device)
    forced = dense_blocks[None, :] | (rows[:, None] == cols[None, :])  # [nq, nk]
    ranked = scores.masked_fill(forced, float("inf"))
    top = ranked.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
    all_blocks = cols.to(torch.int32).expand(batch, heads, nq, nk)
    top = torch.nn.functional.pad(top, (0, nk - keep))
    dense_rows = dense_blocks[:nq, None]
    indices = torch.where(dense_rows, all_blocks, top)
    counts = torch.where(dense_blocks[:nq], nk, keep).to(torch.int32).expand(batch, heads, nq)
    return BlockSelection(indices.contiguous(), counts.contiguous(), nk)


def row_budget(sparsity: float, nq: int, nk: int, num_dense: int) -> int:
    """Blocks each non-dense query row keeps so that all rows together keep ``1 - sparsity`` of
    the ``nq x nk`` pairs (at least the row's forced blocks: dense columns and the diagonal)."""
    total = kept_count(sparsity, nq * nk)
    other_rows = nq - num_dense
    keep = (total - num_dense * nk) // other_rows if other_rows > 0 else nk
    return min(nk, max(keep, num_dense + 1))


def threshold_mask(scores: torch.Tensor, sparsity: float, dense_blocks: torch.Tensor) -> torch.Tensor:
    """RainFusion's mask: ``softmax(scores) >= k-th largest`` per row (ties may keep more), with
    ``k = ceil(nk * (1 - sparsity))``; ``dense_blocks`` rows and columns are forced True."""
    nk = scores.shape[-1]
    probs = torch.softmax(scores, dim=-1)
    threshold = probs.topk(kept_count(sparsity, nk), dim=-1).values[..., -1:]
    # A row with NaN keeps every block, so the NaN reaches its output instead of being dropped.
    mask = (probs >= threshold) | probs.isnan().any(dim=-1, keepdim=True)
    return mask | dense_blocks[None, None, :, None] | dense_blocks[None, None, None, :]


def dense_selection(batch: int, heads: int, nq: int, nk: int, device) -> BlockSelection:
    """Every query block keeps every key block (sparsity 0)."""
    indices = torch.arange(nk, device=device, dtype=torch.int32).expand(batch, heads, nq, nk).contiguous()
    counts = torch.full((batch, heads, nq), nk, device=device, dtype=torch.int32)
    return BlockSelection(indices, counts, nk)


def mask_to_selection(mask: torch.Tensor) -> BlockSelection:
    """Bool ``[B, H, nq, nk]`` -> index lists with kept blocks first, in ascending order."""
    counts = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockSelection(indices, counts, mask.shape[-1], kept_mask=mask)


def indices_to_mask(indices: torch.Tensor, counts: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Index lists -> bool ``[B, H, nq, num_kv_blocks]``; entries past a row's count are ignored."""
    width = indices.shape[-1]
    valid = torch.arange(width, device=indices.device) < counts[..., None]
    target = torch.where(valid, indices.long(), num_kv_blocks)
    mask = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, target, True)[..., :num_kv_blocks]
