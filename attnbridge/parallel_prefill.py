"""Context-parallel prefill of a causal LLM (Qwen3-MoE): one packed batch shared by ``cp_size`` ranks.

    enable_npu_attention(model, "fa", cp_size=2)          # on every rank (torchrun, 2 processes)
    logits = cp_prefill(model, [ids_a, ids_b, ids_c])    # every rank: [len_i, vocab] per sequence

Each rank keeps its zigzag share of every packed sequence. Everything but attention is per token, so
the model runs unchanged on the local tokens at their true positions; attention, for one call,
all-gathers K/V and runs :func:`zigzag_cp_attention`. Logits are gathered back to natural order.

Limits: no KV cache (``use_cache=False``); full logits on every rank (tokens x vocabulary); every
sequence needs ``2 * cp_size`` tokens or more; no sliding window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attnbridge.adapters.transformers import LAYER_ATTR, attn_implementation
from attnbridge.attention.parallel import (
    ZigzagMetadata,
    build_zigzag_metadata,
    gather_kv,
    zigzag_all_gather,
    zigzag_cp_attention,
    zigzag_split,
)

#: Not in transformers' AttentionMaskInterface, so no mask is built: the zigzag metadata defines causality.
CP_IMPLEMENTATION = "attnbridge_cp_prefill"
#: Keyword argument carrying the call's :class:`CPCall` through the model's forward to the attention.
CP_KWARG = "attnbridge_cp"


@dataclass(frozen=True)
class CPCall:
    meta: ZigzagMetadata
    group: dist.ProcessGroup | None


def cp_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: this rank's ``[1, H, T_local, D]`` q/k/v in zigzag order,
    ``([1, T_local, H, D], None)`` out."""
    call: CPCall | None = kwargs.get(CP_KWARG)
    layer = getattr(module, LAYER_ATTR, None)
    if call is None or layer is None:
        raise RuntimeError(f"attention implementation {CP_IMPLEMENTATION!r} only runs inside cp_prefill")
    if kwargs.get("sliding_window") is not None or dropout:
        raise ValueError("cp_prefill supports full causal attention only (no sliding window, no dropout)")
    q_local, k_local, v_local = (t[0].transpose(0, 1) for t in (query, key, value))  # TND
    k, v = gather_kv(k_local, v_local, call.meta, call.group)
    out = zigzag_cp_attention(
        q_local, k, v, call.meta, scale=scaling, platform=layer.platform, backend=layer.backend
    )
    return out.unsqueeze(0), None


def _cp_size_of(model: torch.nn.Module) -> int:
    from attnbridge.enable import _active_handle

    handle = _active_handle(model)
    cp_size = handle.parallel.cp_size if handle is not None and handle.enabled else 1
    if cp_size == 1:
        raise ValueError(
            f"{type(model).__name__} is not enabled for context parallelism: call "
            "enable_npu_attention(model, 'fa', cp_size=N) on every rank first"
        )
    return cp_size


@torch.no_grad()
def cp_prefill(
    model: torch.nn.Module, input_ids: Sequence[torch.Tensor | Sequence[int]]
) -> list[torch.Tensor]:
    """Prefill logits ``[len_i, vocab]`` of every sequence, on every rank (all pass the same sequences)."""
    from transformers import AttentionInterface

    cp_size = _cp_size_of(model)
    device = next(model.parameters()).device
    sequences = [torch.as_tensor(ids, dtype=torch.long).reshape(-1) for ids in input_ids]
    seq_lens = [len(ids) for ids in sequences]
    meta = build_zigzag_metadata(seq_lens, dist.get_rank(), cp_size)
    group = dist.group.WORLD
    tokens = zigzag_split(torch.cat(sequences).to(device), meta)
    positions = zigzag_split(torch.cat([torch.arange(n) for n in seq_lens]).to(device), meta)
    AttentionInterface.register(CP_IMPLEMENTATION, cp_attention_forward)
    with attn_implementation(model, CP_IMPLEMENTATION):
        output = model(
            input_ids=tokens[None],
            position_ids=positions[None],
            use_cache=False,
            **{CP_KWARG: CPCall(meta, group)},
        )
    logits = zigzag_all_gather(output.logits[0], meta, group)
    return list(logits.split(seq_lens))


__all__ = ["CP_IMPLEMENTATION", "cp_attention_forward", "cp_prefill"]
