"""Joint (text + image) attention with only the image tokens sharded: every rank holds the whole
(short) text and attends queries ``[its image chunk, all text]`` to all keys. Ulysses: the image goes
through the all-to-all, the text is sliced to the same heads, so without a ring one kernel call sees
``[image, text]`` as on one device (any backend). Ring: the image keys go around the ring, the text
keys are attended locally, and the partials merge through their LSE. Text rows agree across ranks up
to float rounding."""

from __future__ import annotations

import torch

from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.contract import AttentionContext
from attnbridge.attention.parallel import (
    ParallelGroups,
    heads_to_sequence,
    merge_partials,
    ring_attention,
    sequence_to_heads,
)
from attnbridge.attention.parallel.distributed import all_gather_rows
from attnbridge.attention.parallel.usp import check_heads_divisible


def _head_slice(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    degree = groups.config.ulysses_degree
    if degree == 1:
        return x
    per_rank = x.shape[2] // degree
    start = groups.ulysses_rank * per_rank
    return x[:, :, start : start + per_rank]


def _gather_heads(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    if groups.ulysses_group is None:
        return x
    return all_gather_rows(x.movedim(2, 0), groups.ulysses_group).movedim(0, 2)


def joint_attention_replicated_text(
    layer: AttentionLayer,
    groups: ParallelGroups,
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    real_len: int,
    context: AttentionContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_out [B, T, H, D], image_out [B, C, H, D])`` for full text q/k/v ``[B, T, H, D]`` and this
    rank's chunk ``[B, C, H, D]`` of image q/k/v with ``real_len`` real tokens in all."""
    check_heads_divisible(text[0].shape[2], groups.config.ulysses_degree)
    txt_q, txt_k, txt_v = (_head_slice(t, groups) for t in text)
    if groups.ulysses_group is not None:
        img_q, img_k, img_v = sequence_to_heads(torch.cat(image), groups.ulysses_group).chunk(3)
    else:
        img_q, img_k, img_v = image
    num_image = img_q.shape[1]
    if groups.config.ring_degree == 1:
        # The whole (padded) image sequence for this rank's heads: one call over [real image, text].
        out = layer(
            torch.cat([img_q[:, :real_len], txt_q], dim=1),
            torch.cat([img_k[:, :real_len], txt_k], dim=1),
            torch.cat([img_v[:, :real_len], txt_v], dim=1),
            context=context,
        )
        pad = out.new_zeros(out.shape[0], num_image - real_len, *out.shape[2:])
        out = torch.cat([out[:, :real_len], pad, out[:, real_len:]], dim=1)
    else:
        q = torch.cat([img_q, txt_q], dim=1)
        img_part = ring_attention(
            q, img_k, img_v, layer=layer, group=groups.ring_group, real_len=real_len, return_lse=True
        )
        txt_part = layer(q, txt_k, txt_v, return_lse=True)
        out, _ = merge_partials(*img_part, *txt_part)
        out = out.to(q.dtype)
    text_out = _gather_heads(out[:, num_image:], groups)
    image_out = heads_to_sequence(out[:, :num_image], groups.ulysses_group)
    return text_out, image_out
