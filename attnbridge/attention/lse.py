"""Merging attention computed over disjoint key sets through each part's softmax log-sum-exp (ring
attention's hops), in float32 so that bf16/fp16 partials keep their precision across many hops."""

from __future__ import annotations

import torch


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions (``out`` BSHD, ``lse`` ``[B, H, S]``) of the same queries over disjoint
    keys: ``(out, lse)`` in float32 with ``lse = logaddexp(lse_a, lse_b)``. A row whose keys were all masked
    (``lse = -inf``) contributes nothing; ``-inf`` on both sides stays ``out = 0, lse = -inf`` instead of
    becoming NaN."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) is NaN: measure both sides from 0 where no key was seen at all.
    reference = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - reference).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    weight_b = torch.exp(lse_b - reference).transpose(1, 2).unsqueeze(-1)
    out = out_a.float() * weight_a + out_b.float() * weight_b
    return out, lse
