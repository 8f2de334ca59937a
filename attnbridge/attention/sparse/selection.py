"""Which key blocks each query block attends: pooled scores, estimated block mass, top-k,
thresholds, mask <-> index lists. Tensor code only: no Python loop over blocks, no host sync."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnbridge.attention.options import kept_count


@dataclass(frozen=True)
class BlockSelection:
    """Kept key blocks per query block: ``indices`` int32 ``[B, H, nq, nk]``, the first ``counts``
    (int32 ``[B, H, nq]``) entries of a row its kept blocks ascending, later entries ignored."""

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
    """Mean of BSHD ``x`` over each block of ``block_size`` tokens -> float32 ``[B, nb, H, D]``;
    a partial tail block is the mean of the tokens it has."""
    batch, seq, heads, dim = x.shape
    full = seq // block_size
    parts = []
    if full:
        body = x[:, : full * block_size].reshape(batch, full, block_size, heads, dim)
        parts.append(body.mean(dim=2, dtype=torch.float32))
    if seq > full * block_size:
        parts.append(x[:, full * block_size :].mean(dim=1, keepdim=True, dtype=torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def valid_keys_per_block(key_lengths: torch.Tensor, seq: int, block_size: int) -> torch.Tensor:
    """How many of each block's keys are valid (not padding), per sample: float32 ``[B, nb]``."""
    starts = torch.arange(0, seq, block_size, device=key_lengths.device)
    sizes = (seq - starts).clamp(max=block_size)
    return (key_lengths[:, None] - starts[None, :]).clamp(min=0).minimum(sizes).float()


def pool_keys(k: torch.Tensor, block_size: int, key_lengths: torch.Tensor | None) -> torch.Tensor:
    """:func:`pool_blocks` over the valid keys only (padded keys may hold NaN); no valid key: zero."""
    if key_lengths is None:
        return pool_blocks(k, block_size)
    seq = k.shape[1]
    valid = torch.arange(seq, device=k.device)[None, :] < key_lengths[:, None]
    sums = pool_blocks(torch.where(valid[..., None, None], k, 0), block_size)
    starts = torch.arange(0, seq, block_size, device=k.device)
    sizes = (seq - starts).clamp(max=block_size).float()
    counts = valid_keys_per_block(key_lengths, seq, block_size)
    return sums * (sizes / counts.clamp(min=1.0))[..., None, None]


def pooled_scores(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, key_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Block logits ``q̄ · k̄ᵀ · scale``: float32 ``[B, H_q, nq, nk]``; -inf for a key block with no
    valid key (``key_lengths``: valid keys per sample)."""
    q_bar = pool_blocks(q, block_size).transpose(1, 2)  # [B, Hq, nq, D]
    k_bar = pool_keys(k, block_size, key_lengths).transpose(1, 2)  # [B, Hkv, nk, D]
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k_bar = k_bar.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q_bar, k_bar.transpose(-1, -2)) * scale
    if key_lengths is not None:
        starts = torch.arange(scores.shape[-1], device=q.device) * block_size
        padding = starts[None, :] >= key_lengths[:, None]  # [B, nk]
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return scores


#: Sub-blocks per block in :func:`estimated_block_mass` (a 128-token block: 4 means of 32).
SUB_BLOCKS = 4
#: (logit factor, spread term) of the estimate that ranks and places blocks.
RANK_ESTIMATE = (1.0, True)
#: (logit factor, spread term) of the estimate that counts the blocks a ``mass`` threshold needs
#: (calibrated: see block_sparse).
MASS_ESTIMATE = (2.0, False)
#: Share of a head's budget that :func:`select_by_mass` spreads evenly over the query blocks.
EVEN_SHARE = 0.75


def estimated_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float,
    key_lengths: torch.Tensor | None = None,
    estimates: tuple[tuple[float, bool], ...] = (RANK_ESTIMATE,),
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Estimated softmax mass of every (query block, key block) pair, from sub-block statistics.

    For query and key sub-blocks with means ``q̄ₐ``, ``k̄ᵦ`` and per-dimension variances ``σₐ²``,
    ``σᵦ²``, the logit is ``t · scale · q̄ₐ · k̄ᵦ``, plus with the spread term ``scale² V / 2``, where
    ``V = σₐ² |k̄ᵦ|² + σᵦ² |q̄ₐ|² + D σₐ² σᵦ²`` is the variance of the pair's token logits (E exp of
    a normal = exp of mean + half variance), plus the log of the key sub-block's token count. Each
    query sub-block takes a softmax over the key sub-blocks; a pair's mass sums its sub-block pairs,
    weighted by query sub-block size. A partial tail block has fewer sub-blocks; key sub-blocks past
    ``key_lengths`` get no mass. ``estimates``: the ``(t, spread term)`` of each estimate.

    Returns per estimate float32 ``[B, H_q, nq, nk]`` log mass (rows sum to 1), and bool
    ``nan_pairs`` ``[B, H_q, nq, nk]``: pairs with a NaN logit, to keep so the NaN reaches the output.
    """
    batch, seq, _, dim = q.shape
    sub_blocks = SUB_BLOCKS
    if block_size % sub_blocks:
        raise ValueError(f"block size {block_size} is not a multiple of {sub_blocks} sub-blocks")
    sub = block_size // sub_blocks
    nb, ns = math.ceil(seq / block_size), math.ceil(seq / sub)
    groups = q.shape[2] // k.shape[2]

    def stats(x, lengths=None):
        """Sub-block means [B, H, ns, D], squared norms and per-dimension variances [B, H, ns]."""
        mean = pool_keys(x, sub, lengths).transpose(1, 2)
        square = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square()[..., None]
        mean_square = pool_keys(square, sub, lengths).transpose(1, 2)[..., 0]
        norm = mean.square().sum(dim=-1)
        return mean, norm, ((mean_square - norm) / dim).clamp(min=0.0)

    q_bar, q_norm, q_var = stats(q)
    k_stats = stats(k, key_lengths)
    k_bar, k_norm, k_var = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in k_stats)
    logits = torch.matmul(q_bar, k_bar.transpose(-1, -2)) * scale  # [B, Hq, ns, ns]
    nan = logits.isnan()
    padded = nb * sub_blocks - ns
    nan_pairs = torch.nn.functional.pad(nan, (0, padded, 0, padded))
    nan_pairs = nan_pairs.view(batch, -1, nb, sub_blocks, nb, sub_blocks).any(dim=5).any(dim=3)
    # Sub-block sizes built on the device (no host-to-device copy, so a CUDA graph can capture it).
    sizes = (seq - sub * torch.arange(ns, device=q.device)).clamp(max=sub).float()
    log_sizes = sizes.log()
    key_bias = log_sizes.expand(batch, ns)
    if key_lengths is not None:  # each key sub-block weighs its valid keys; one with none, nothing
        key_bias = valid_keys_per_block(key_lengths, seq, sub).log()
    results = []
    for temperature, spread in estimates:
        z = logits * temperature
        if spread:
            variance = (
                q_var[..., :, None] * k_norm[..., None, :]
                + k_var[..., None, :] * q_norm[..., :, None]
                + dim * q_var[..., :, None] * k_var[..., None, :]
            )
            z = z + (0.5 * scale * scale) * variance
        z = z.masked_fill(nan, float("-inf")) + key_bias[:, None, None, :]
        log_p = z - z.logsumexp(dim=-1, keepdim=True) + log_sizes[:, None]
        log_p = torch.nn.functional.pad(log_p, (0, padded, 0, padded), value=float("-inf"))
        pairs = log_p.view(batch, -1, nb, sub_blocks, nb, sub_blocks).logsumexp(dim=5).logsumexp(dim=3)
        pairs = pairs - pairs.logsumexp(dim=-1, keepdim=True)
        # A row whose every logit is NaN has nothing to normalize: its pairs are kept through nan_pairs.
        results.append(pairs.masked_fill(pairs.isnan(), float("-inf")))
    return results, nan_pairs


def _rank_rows(log_mass: torch.Tensor, forced: torch.Tensor):
    """``(order, mass, forced)`` of each row's key blocks, forced first, then by mass descending."""
    forced = forced.expand_as(log_mass)
    key = log_mass.masked_fill(forced, float("inf"))
    order = key.argsort(dim=-1, descending=True, stable=True)
    return order, log_mass.exp().gather(-1, order), forced.gather(-1, order)


def mass_counts(log_mass: torch.Tensor, threshold: float, forced: torch.Tensor) -> torch.Tensor:
    """Per row, the fewest key blocks whose mass reaches ``threshold``: int ``[..., nq]``. Blocks
    count in :func:`select_by_mass`'s order, so a row keeps at least its ``forced`` blocks."""
    _, mass, forced_sorted = _rank_rows(log_mass, forced)
    before = mass.cumsum(dim=-1) - mass
    return ((before < threshold) | forced_sorted).sum(dim=-1)


def select_by_mass(
    log_mass: torch.Tensor,
    budget: torch.Tensor,
    forced: torch.Tensor,
    *,
    even_share: float = EVEN_SHARE,
) -> BlockSelection:
    """Place ``budget`` (int ``[B, H]``) block pairs per head over ``log_mass`` ``[B, H, nq, nk]`` (log
    estimated mass, rows summing to 1).

    Rows take key blocks in :func:`_rank_rows` order (``forced``, bool broadcast to ``log_mass``,
    first). Each row keeps at least ``even_share`` of the budget left after forced pairs, over
    ``nq`` (and at least 1): a floor against a wrong estimate. The rest goes where it lowers the
    squared dropped mass of its row most: a gain of ``p (2 d + p)`` for dropped mass ``d + p -> d``.
    Forced pairs and floors are kept even past ``budget``; every row keeps a prefix of its order.
    """
    batch, heads, nq, nk = log_mass.shape
    order, mass, forced_sorted = _rank_rows(log_mass, forced)
    after = (1.0 - mass.cumsum(dim=-1)).clamp(min=0.0)
    gain = mass * (2.0 * after + mass)
    rank = torch.arange(nk, device=log_mass.device)
    free = budget - forced_sorted.flatten(2).sum(dim=-1)  # [B, H]
    floor = torch.div(free * even_share, nq, rounding_mode="floor").clamp(min=1)
    must = forced_sorted | (rank < floor[..., None, None])
    gain = gain.masked_fill(must, float("inf")).flatten(2)
    head_order = gain.argsort(dim=-1, descending=True)
    head_rank = torch.empty_like(head_order).scatter_(
        -1, head_order, torch.arange(nq * nk, device=log_mass.device).expand_as(head_order)
    )
    budget = torch.maximum(budget, must.flatten(2).sum(dim=-1))
    counts = (head_rank < budget[..., None]).view(batch, heads, nq, nk).sum(dim=-1)
    kept = rank < counts[..., None]
    mask = torch.zeros_like(kept).scatter_(-1, order, kept)
    indices = torch.where(kept, order, nk).sort(dim=-1).values
    indices = indices.masked_fill(indices == nk, 0).to(torch.int32)
    return BlockSelection(indices.contiguous(), counts.to(torch.int32).contiguous(), nk, kept_mask=mask)


def threshold_mask(scores: torch.Tensor, sparsity: float, dense_blocks: torch.Tensor) -> torch.Tensor:
    """RainFusion's mask: ``softmax(scores) >= k-th largest`` per row (ties may keep more),
    ``k = ceil(nk * (1 - sparsity))``; ``dense_blocks`` rows and columns forced."""
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


def check_block_lists(q, k, kv_indices, kv_counts, block_size: int, key_valid) -> None:
    """The index lists and ``key_valid`` of a ``block_sparse_attention`` call against q and k (BSHD)."""
    batch, s_q, heads = q.shape[0], q.shape[1], q.shape[2]
    n_q_blocks = -(-s_q // block_size)
    if kv_indices.dim() != 4 or kv_counts.dim() != 3 or kv_counts.shape != kv_indices.shape[:3]:
        raise ValueError(
            "block_sparse_attention: kv_indices must be [B, H, n_q_blocks, width] and kv_counts "
            f"[B, H, n_q_blocks]; got {tuple(kv_indices.shape)} and {tuple(kv_counts.shape)}"
        )
    b, h, nq = kv_indices.shape[:3]
    if b not in (1, batch) or h not in (1, heads) or nq != n_q_blocks:
        raise ValueError(
            f"block_sparse_attention: kv_indices {tuple(kv_indices.shape)} does not fit q {tuple(q.shape)} "
            f"with block_size {block_size} (expected [{batch} or 1, {heads} or 1, {n_q_blocks}, width])"
        )
    if key_valid is not None and (key_valid.dtype != torch.bool or tuple(key_valid.shape) != (k.shape[1],)):
        raise ValueError(
            f"block_sparse_attention: key_valid must be a bool tensor of shape [{k.shape[1]}] (S_kv); "
            f"got {key_valid.dtype} {tuple(key_valid.shape)}"
        )
