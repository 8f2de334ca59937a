"""The ``block_sparse`` backend: per head, the 128-token (query block, key block) pairs that hold
the most estimated attention mass; attention runs on exactly those blocks.

Selection (:mod:`attnbridge.attention.sparse.selection`), three steps of tensor code:

1. **Estimate.** Each block is read as 4 sub-blocks of 32 tokens: their means and the spread of
   their tokens around the means. The logits between sub-block means, raised by half the variance
   the spread gives the token logits, plus the log of each key sub-block's size, give every query
   sub-block a softmax over the key sub-blocks; summed per block pair, they estimate how the mass
   of each query block spreads over the key blocks
   (:func:`~attnbridge.attention.sparse.selection.estimated_block_mass`). One
   ``[4 nb, D] x [D, 4 nb]`` product per head, 16 times the work of one mean per block.
2. **Budget.** ``sparsity`` is the fraction of the ``nq x nk`` block pairs skipped per head: each
   head keeps ``ceil((1 - sparsity) nq nk)`` pairs, forced ones included, so the work is
   ``1 - sparsity`` of dense (more only where the forced blocks and one block per query block do
   not fit in it). With ``mass`` instead, each query block counts the fewest key blocks whose
   estimated mass reaches ``mass`` (:func:`~attnbridge.attention.sparse.selection.mass_counts`;
   this count reads the mean logits doubled, without the spread term, which matched the exact
   mass best on the generators of ``scripts/selection_quality.py``), and the head keeps the sum of
   those counts, clamped to ``[min_kept, max_kept]`` of its pairs: the work follows the input, per
   head and per call, and the blocks are placed as for a fixed budget.
3. **Placement.** Three quarters of the head's budget (after forced pairs) is shared evenly: each
   query block keeps at least that many of its best key blocks, and at least one. The last
   quarter goes where it lowers the squared estimated dropped mass of its query block most
   (:func:`~attnbridge.attention.sparse.selection.select_by_mass`): to query blocks whose
   attention is spread rather than concentrated. The even share guards against an estimate that
   is wrong about a query block.

``scripts/selection_quality.py`` measures the selection against the blocks of highest exact mass.

Forced blocks: only the text of joint attention (every block holding a text token is a dense row
and a dense column). There is no diagonal or first-frame prior, and the first-frame rule of the
shared rules below does not apply to ``block_sparse``: a first-frame or diagonal block is kept when
its estimated mass earns it. A block pair whose estimate is NaN is kept, so a NaN query or key
reaches every output row that attends it. Dense steps and cross-attention run dense ``fa`` (rules
in :mod:`attnbridge.attention.sparse.layout`).

* CPU: FlexAttention with an exact block mask (the reference); CUDA: attnbridge's Triton kernel,
  which walks each query block's list of key blocks, longest lists first.
* Ascend: sgl-kernel-npu's block-sparse kernel fed *our* selection, so both platforms attend the
  same blocks.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch

from attnbridge.attention.options import fraction, kept_count, option
from attnbridge.attention.registry import Backend
from attnbridge.attention.sparse.ascend import ASCEND_BLOCK_SPARSE
from attnbridge.attention.sparse.impl import Selector, SparseOptions
from attnbridge.attention.sparse.platforms import block_mask_platforms
from attnbridge.attention.sparse.selection import (
    MASS_ESTIMATE,
    RANK_ESTIMATE,
    BlockSelection,
    dense_selection,
    estimated_block_mass,
    mass_counts,
    select_by_mass,
)

_DEFAULT_SPARSITY = 0.75


def _open_fraction(backend: str, key: str, value: Any) -> float | None:
    """None, or a number in ``(0, 1]``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"backend {backend!r}: {key} must be a number in (0, 1] or None; got {value!r}")
    return float(value)


def _closed_fraction(backend: str, key: str, value: Any) -> float:
    """A number in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"backend {backend!r}: {key} must be a number in [0, 1]; got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class BlockSparseOptions(SparseOptions):
    """Options of ``block_sparse``: a fixed budget (``sparsity``) or an error-driven one (``mass``)."""

    sparsity: float = option(
        _DEFAULT_SPARSITY,
        "fraction of the (query block, key block) pairs each head skips, in [0, 1); not with `mass`",
        fraction,
    )
    mass: float | None = option(
        None,
        "instead of `sparsity`: each query block needs the fewest key blocks whose estimated softmax "
        "mass reaches this, in (0, 1]; the head keeps as many pairs as its query blocks need together",
        _open_fraction,
    )
    min_kept: float = option(
        0.0,
        "with `mass`: the fewest pairs a head keeps, as a fraction of its pairs, in [0, 1]",
        _closed_fraction,
    )
    max_kept: float = option(
        1.0,
        "with `mass`: the most pairs a head keeps, as a fraction of its pairs, in [0, 1]",
        _closed_fraction,
    )

    def __post_init__(self) -> None:
        if self.mass is not None and self.sparsity != _DEFAULT_SPARSITY:
            raise ValueError(
                f"backend 'block_sparse': give mass or sparsity, not both (got mass={self.mass}, "
                f"sparsity={self.sparsity})"
            )
        if self.mass is None and (self.min_kept, self.max_kept) != (0.0, 1.0):
            raise ValueError(
                "backend 'block_sparse': min_kept and max_kept bound the budget of mass; they need mass "
                f"(got min_kept={self.min_kept}, max_kept={self.max_kept}, mass=None)"
            )
        if self.min_kept > self.max_kept:
            raise ValueError(
                f"backend 'block_sparse': min_kept ({self.min_kept}) must not exceed max_kept ({self.max_kept})"
            )


def select_block_sparse(q, k, scale: float, options, layout) -> BlockSelection:
    """The kept key blocks of every query block (q, k in mask order): see the module docstring.
    ``options`` may be plain :class:`SparseOptions` (a fixed budget)."""
    budget = [
        getattr(options, name, default)
        for name, default in (("mass", None), ("min_kept", 0.0), ("max_kept", 1.0))
    ]
    return layout.select(_selection_lists, q, k, scale, options.sparsity, *budget, layout.text_start_block)


def _selection_lists(
    q, k, scale, sparsity, mass, min_kept, max_kept, text_start_block, block_size, key_lengths
):
    batch, seq, heads, _ = q.shape
    nb = -(-seq // block_size)
    pairs = nb * nb
    if mass is None and kept_count(sparsity, pairs) == pairs:
        dense = dense_selection(batch, heads, nb, nb, q.device)
        return dense.indices, dense.counts, None
    estimates = (RANK_ESTIMATE,) if mass is None else (RANK_ESTIMATE, MASS_ESTIMATE)
    (log_mass, *counting), nan_pairs = estimated_block_mass(q, k, block_size, scale, key_lengths, estimates)
    text = torch.arange(nb, device=q.device) >= text_start_block
    forced = text[:, None] | text[None, :] | nan_pairs
    if mass is None:
        budget = torch.full((batch, heads), kept_count(sparsity, pairs), device=q.device)
    else:
        needed = mass_counts(counting[0], mass, forced).sum(dim=-1)
        low = 0 if min_kept == 0.0 else kept_count(1.0 - min_kept, pairs)
        budget = needed.clamp(min=low, max=kept_count(1.0 - max_kept, pairs))
    selection = select_by_mass(log_mass, budget, forced)
    return selection.indices, selection.counts, selection.kept_mask


MASS_RANKED = Selector("estimated-mass", select_block_sparse)

BACKEND = Backend(
    "block_sparse",
    "128-token block-sparse attention on the blocks of highest estimated mass",
    platforms=block_mask_platforms(MASS_RANKED, ASCEND_BLOCK_SPARSE),
    options=BlockSparseOptions,
    sparse=True,
    order=4,
)
