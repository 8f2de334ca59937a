"""Attention with an explicit mask, which the backend contract does not carry.

Used only where the upstream model passes a real (non-trivial) mask: padded text in a Qwen-Image
batch, or a user-supplied Wan mask. It is the upstream computation (torch SDPA), so outputs stay
identical; the chosen backend is skipped for those calls and a warning says so once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("attnbridge")
_warned: set[str] = set()


def masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, backend: str, where: str
) -> torch.Tensor:
    """torch SDPA on BSHD tensors with ``mask`` (bool: True attends, or additive), BSHD out."""
    if where not in _warned:
        _warned.add(where)
        logger.warning(
            "%s: attention with a padding mask runs through torch SDPA, not backend %r "
            "(the backend contract has no mask); unmasked calls still use %r",
            where,
            backend,
            backend,
        )
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=0.0,
        is_causal=False,
    )
    return out.transpose(1, 2)
