"""Merging attention computed over disjoint key sets, using each part's softmax log-sum-exp.

Ring attention runs the queries of a rank against one key/value chunk at a time; the exact result
over all keys is the LSE-weighted sum of the partial outputs. The math is done in float32 so that
bf16/fp16 partials do not lose precision across many hops.
"""

from __future__ import annotations

import torch


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions of the same queries over disjoint keys.

    ``out_*`` are BSHD ``[B, S, H, D]``, ``lse_*`` are ``[B, H, S]`` (natural log). Returns
    ``(out, lse)`` in float32: ``lse = logaddexp(lse_a, lse_b)`` and
    ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.

    A row whose keys were all masked has ``lse = -inf``; it then contributes nothing, and a row
    that is ``-inf`` on both sides stays ``out = 0, lse = -inf`` instead of becoming NaN.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) is NaN: measure both sides from 0 where no key was seen at all.
    reference = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - reference).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    weight_b = torch.exp(lse_b - reference).transpose(1, 2).unsqueeze(-1)
    out = out_a.float() * weight_a + out_b.float() * weight_b
    return out, lse
