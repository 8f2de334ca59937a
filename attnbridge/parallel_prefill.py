"""Context-parallel prefill of a causal LLM (Qwen3-MoE): one packed batch shared by ``cp_size`` ranks.

    enable_npu_attention(model, "fa", cp_size=2)          # on every rank (torchrun, 2 processes)
    logits = cp_prefill(model, [ids_a, ids_b, ids_c])    # every rank: [len_i, vocab] per sequence

The sequences are packed into one token stream and each rank keeps its zigzag share of every
sequence (:mod:`attnbridge.attention.parallel.zigzag`). Everything but attention is per token, so the
model runs unchanged on the local tokens at their true positions; only attention is swapped, for one
call, to one that all-gathers K/V and runs :func:`zigzag_cp_attention`. Logits are gathered back to
natural order.

Limits: no KV cache is filled (``use_cache=False``) and the full logits are gathered (memory grows
with tokens x vocabulary); every sequence needs ``2 * cp_size`` tokens or more; sliding-window
layers are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

#: Attention implementation of :func:`cp_prefill` alone; not in transformers' AttentionMaskInterface,
#: so no mask is built: the zigzag metadata defines causality.
CP_IMPLEMENTATION = "attnbridge_cp_prefill"
#: Keyword argument through which the model's forward hands the call's metadata to the attention.
CP_KWARG = "attnbridge_cp"


@dataclass(frozen=True)
class CPCall:
    meta: ZigzagMetadata
    group: dist.ProcessGroup | None


def cp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: this rank's ``[1, H, T_local, D]`` q/k/v in zigzag order,
    ``([1, T_local, H, D], None)`` out."""
    call: CPCall | None = kwargs.get(CP_KWARG)
    layer = getattr(module, LAYER_ATTR, None)
    if call is None or layer is None:
        raise RuntimeError(f"attention implementation {CP_IMPLEMENTATION!r} only runs inside cp_prefill")
    if sliding_window is not None or dropout:
        raise ValueError("cp_prefill supports full causal attention only (no sliding window, no dropout)")
    q_local, k_local, v_local = (t[0].transpose(0, 1) for t in (query, key, value))  # TND
    k, v = gather_kv(k_local, v_local, call.meta, call.group)
    out = zigzag_cp_attention(
        q_local, k, v, call.meta, scale=scaling, platform=layer.platform, backend=layer.backend
    )
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CP_IMPLEMENTATION, cp_attention_forward)


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
    """Prefill logits ``[len_i, vocab]`` of every sequence in ``input_ids``, on every rank. Every rank passes
    the same sequences; each computes its zigzag share of the tokens."""
    cp_size = _cp_size_of(model)
    device = next(model.parameters()).device
    sequences = [torch.as_tensor(ids, dtype=torch.long).reshape(-1) for ids in input_ids]
    seq_lens = [len(ids) for ids in sequences]
    meta = build_zigzag_metadata(seq_lens, dist.get_rank(), cp_size)
    group = dist.group.WORLD
    tokens = zigzag_split(torch.cat(sequences).to(device), meta)
    positions = zigzag_split(torch.cat([torch.arange(n) for n in seq_lens]).to(device), meta)
    _register()
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
