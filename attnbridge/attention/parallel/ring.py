"""Ring attention: at hop ``s`` rank ``r`` holds the K/V chunk of rank ``(r - s) mod R``; the transfer
for hop ``s + 1`` is posted before hop ``s`` computes. Partials merge through their LSE in float32."""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.lse import merge_partials
from attnbridge.attention.parallel.distributed import group_rank, group_size


def valid_keys(real_len: int | None, src: int, chunk: int) -> int:
    """Real (non-padding) keys in chunk ``src`` of a sequence of ``real_len`` tokens."""
    if real_len is None:
        return chunk
    return min(max(real_len - src * chunk, 0), chunk)


def _diagonal_partial(layer, q, k, v, *, valid, scale):
    """Causal attention of a chunk to itself when only its first ``valid`` tokens are real."""
    if valid == q.shape[1]:
        return layer(q, k, v, causal=True, scale=scale, return_lse=True)
    out, lse = layer(q[:, :valid], k[:, :valid], v[:, :valid], causal=True, scale=scale, return_lse=True)
    # Padded query rows see no key in this chunk: out 0, lse -inf (merge_partials ignores them).
    pad = q.shape[1] - valid
    out = torch.cat([out, out.new_zeros(out.shape[0], pad, *out.shape[2:])], dim=1)
    lse = torch.cat([lse, lse.new_full((*lse.shape[:2], pad), float("-inf"))], dim=2)
    return out, lse


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layer: AttentionLayer,
    group: dist.ProcessGroup | None,
    real_len: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """This rank's query chunk over the keys of every rank in ``group``. BSHD chunks of length ``C``, rank
    ``i`` holding tokens ``[i*C, (i+1)*C)`` of ``real_len`` real ones. ``causal``: global positions, top-left
    aligned. ``return_lse``: also the float32 LSE ``[B, H, S_q]``, to merge with keys outside the ring
    (replicated text); non-causal queries may then be longer than the key chunk."""
    size, rank = group_size(group), group_rank(group)
    chunk = k.shape[1]
    buffers = [torch.stack([k, v]).contiguous(), None]
    if size > 1:
        buffers[1] = torch.empty_like(buffers[0])
        send_to = dist.get_global_rank(group, (rank + 1) % size)
        recv_from = dist.get_global_rank(group, (rank - 1) % size)
    out = lse = None
    for hop in range(size):
        current = buffers[hop % 2]
        requests = []
        if hop + 1 < size:
            incoming = buffers[(hop + 1) % 2]
            requests = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, current, send_to, group),
                    dist.P2POp(dist.irecv, incoming, recv_from, group),
                ]
            )
        src = (rank - hop) % size
        valid = valid_keys(real_len, src, chunk)
        part = None
        if valid == 0 or (causal and src > rank):
            pass  # only padding, or keys after every query of this rank
        elif causal and src == rank:
            part = _diagonal_partial(layer, q, current[0], current[1], valid=valid, scale=scale)
        else:
            part = layer(q, current[0, :, :valid], current[1, :, :valid], scale=scale, return_lse=True)
        if part is not None:
            out, lse = part if out is None else merge_partials(out, lse, *part)
        for request in requests:
            request.wait()
    if out is None:  # unreachable while real_len >= 1 (chunk 0 always has a real key)
        out = torch.zeros_like(q)
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)
