"""The independent float64 attention reference every attnbridge test compares against.

Deliberately naive (one einsum for the scores, a softmax, one einsum for the output) so that it is
obviously right; it shares no code with the kernels or the emulated ops it judges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention on BSHD tensors, in float64.

    ``q`` ``[B, S_q, H_q, D]``, ``k`` ``[B, S_kv, H_kv, D]``, ``v`` ``[B, S_kv, H_kv, D_v]`` with
    ``H_q % H_kv == 0`` (query head ``h`` reads kv head ``h // (H_q // H_kv)``).
    ``kv_lengths[b]``: only the first ``kv_lengths[b]`` keys of batch ``b`` exist (right padding).
    ``causal``: bottom-right aligned to the real keys, query ``i`` sees key ``j`` iff
    ``j <= i + kv_len - S_q``.

    Returns ``out`` float64 ``[B, S_q, H_q, D_v]`` and ``lse`` float64 ``[B, H_q, S_q]`` (natural log).
    A query row that sees no key gets ``out = 0`` and ``lse = -inf``.
    """
    batch, s_q, heads, head_dim = q.shape
    s_kv, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads != 0:
        raise ValueError(f"q heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    group = heads // kv_heads
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=2)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale

    lengths = [s_kv] * batch if kv_lengths is None else [int(n) for n in kv_lengths]
    if len(lengths) != batch:
        raise ValueError(f"kv_lengths has {len(lengths)} entries for batch {batch}")
    rows = torch.arange(s_q)[:, None]
    cols = torch.arange(s_kv)[None, :]
    visible = torch.zeros(batch, s_q, s_kv, dtype=torch.bool)
    for b, kv_len in enumerate(lengths):
        allowed = cols < kv_len
        if causal:
            allowed = allowed & (cols <= rows + (kv_len - s_q))
        visible[b] = allowed
    scores = scores.masked_fill(~visible[:, None], float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    sees_nothing = ~visible.any(dim=-1)[:, None, :, None]  # [B, 1, S_q, 1]
    probs = probs.masked_fill(sees_nothing, 0.0)  # softmax of an all -inf row is NaN
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v64)
    return out, lse


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64, the error measure every test states."""
    actual64 = actual.detach().to(torch.float64)
    expected64 = expected.detach().to(torch.float64)
    return float(torch.linalg.vector_norm(actual64 - expected64) / torch.linalg.vector_norm(expected64))
