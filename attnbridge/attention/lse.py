"""Merging attention over disjoint key sets through their log-sum-exp, in float32 (precise over many hops)."""

from __future__ import annotations

import torch


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partials (``out`` BSHD, ``lse`` ``[B, H, S]``) of the same queries as float32 ``(out, lse)``. A
    row with ``lse = -inf`` contributes nothing; ``-inf`` on both sides gives ``out = 0``, not NaN."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) is NaN: measure both sides from 0 where no key was seen at all.
    reference = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - reference).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    weight_b = torch.exp(lse_b - reference).transpose(1, 2).unsqueeze(-1)
    out = out_a.float() * weight_a + out_b.float() * weight_b
    return out, lse
