"""Patch transformers LLMs (Qwen3-MoE) through ``AttentionInterface``: one attention function,
registered as ``attnbridge_<backend>`` (also in ``AttentionMaskInterface`` with the SDPA mask builder:
transformers builds no mask for unknown names), runs the :class:`AttentionLayer` stored on each module.
Unmasked calls run causally, right-padded batches with their key lengths; other masks (left padding,
sliding windows) and dropout run transformers' SDPA, with a warning."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbridge.adapters.forward_state import ForwardState
from attnbridge.adapters.layers import make_layers, model_device
from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.contract import AttentionContext
from attnbridge.attention.masks import leading_lengths
from attnbridge.attention.registry import Backend, backend_names
from attnbridge.models import ModelFamily
from attnbridge.notices import warn_once

#: Attributes on each patched attention module: its AttentionLayer and its model's ForwardState.
LAYER_ATTR = "_attnbridge_layer"
PADDING_ATTR = "_attnbridge_padding"


def attnbridge_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q/k/v ``[B, H, S, D]`` in, ``([B, S, H, D], None)`` out."""
    layer: AttentionLayer | None = getattr(module, LAYER_ATTR, None)
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation 'attnbridge_*' but was not patched by "
            "enable_npu_attention (no AttentionLayer on the module)"
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    key_lengths = None
    if attention_mask is not None:
        # A right-padded prefill (no cache): causal attention over each sample's real keys.
        padding = getattr(module, PADDING_ATTR, None)
        if padding is not None and padding.key_lengths is not None and q_len == kv_len == padding.seq_len:
            key_lengths = padding.key_lengths
    if dropout or kwargs.get("sliding_window") or (attention_mask is not None and key_lengths is None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        warn_once(
            "attention with a mask attnbridge backends do not take (left padding, sliding window) or "
            "with dropout runs through transformers' SDPA; unmasked and right-padded calls use the backend"
        )
        inputs = (module, query, key, value, attention_mask)
        return sdpa_attention_forward(
            *inputs, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(is_causal) and q_len > 1
    if causal and kv_len > q_len and attention_mask is None:
        # As transformers' SDPA path: a prefill into an empty static cache, whose real keys are the
        # first q_len (SDPA's is_causal is top-left aligned).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    context = AttentionContext(kind="self", key_lengths=key_lengths)
    return layer(q, k, v, causal=causal, scale=scaling, context=context), None


def right_padding_lengths(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each sample's real tokens if the 2-D ``mask`` [B, S] is right-padded, else None."""
    lengths = leading_lengths(mask) if mask is not None and mask.dim() == 2 else None
    return None if lengths is None else lengths.to(torch.int32)


def register_implementation(backend: str) -> str:
    """Register our attention function (and the SDPA mask builder) under ``attnbridge_<backend>``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"attnbridge_{backend}"
    AttentionInterface.register(name, attnbridge_attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def _implementations(model: torch.nn.Module) -> list[tuple[Any, Any]]:
    """``(config, its _attn_implementation_internal)`` for each config set_attn_implementation touches."""
    seen: dict[int, Any] = {}
    pending = [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    while pending:
        config = pending.pop()
        if id(config) in seen or not hasattr(config, "_attn_implementation"):
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                pending.append(sub)
    return [(config, getattr(config, "_attn_implementation_internal", None)) for config in seen.values()]


@contextlib.contextmanager
def attn_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name`` (already registered) within the block."""
    saved = _implementations(model)
    try:
        for config, _ in saved:
            config._attn_implementation_internal = name
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value


#: Why sparse backends are refused for causal LLMs (also shown by the support table and docs).
SPARSE_LM_REFUSAL = "is a sparse video/image backend (it needs a latent token grid)"


@dataclass
class TransformersModelPatch:
    """Our layers on a transformers model's attention modules, its attn implementation switched."""

    model: torch.nn.Module
    backend: str
    layers: dict[str, AttentionLayer]
    modules: dict[str, torch.nn.Module]
    padding: ForwardState = field(default_factory=ForwardState)
    originals: list[tuple[Any, Any]] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def _before_forward(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        seq_len = mask.shape[-1] if isinstance(mask, torch.Tensor) else 0
        self.padding.set(key_lengths=right_padding_lengths(mask), seq_len=seq_len)

    def _after_forward(self, module, args, output) -> None:
        self.padding.set()

    def apply(self) -> None:
        """Switch the attention implementation; on any failure undo what was done and raise."""
        self.originals = _implementations(self.model)
        try:
            name = register_implementation(self.backend)
            for path, module in self.modules.items():
                module.__dict__[LAYER_ATTR] = self.layers[path]
                module.__dict__[PADDING_ATTR] = self.padding
            self._hooks = [
                self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                self.model.register_forward_hook(self._after_forward, always_call=True),
            ]
            self.model.set_attn_implementation(name)
            if self.model.config._attn_implementation != name:
                raise ValueError(
                    f"{type(self.model).__name__} did not accept attn_implementation {name!r} "
                    "(its attention does not go through transformers' AttentionInterface)"
                )
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for config, value in self.originals:
            config._attn_implementation_internal = value
        self.originals = []
        for module in self.modules.values():
            module.__dict__.pop(LAYER_ATTR, None)
            module.__dict__.pop(PADDING_ATTR, None)


def _head_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def plan_transformers_model(
    model: torch.nn.Module,
    family: ModelFamily,
    backend: Backend,
    options: Any,
    *,
    platform: str | None,
    strict: bool,
) -> TransformersModelPatch:
    """Check the model and build its layers, changing nothing yet."""
    if backend.sparse:
        raise ValueError(
            f"backend {backend.name!r} {SPARSE_LM_REFUSAL}; {type(model).__name__} is a causal LM: use a "
            f"dense backend ({', '.join(backend_names(sparse=False))})"
        )
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"{type(model).__name__} has no set_attn_implementation; attnbridge needs transformers >= 5"
        )
    sites = family.attention_modules(model)
    head_size = _head_size(model)
    specs = [(path, site.kind, head_size) for path, _, site in sites]
    # padded: a batch of prompts is padded to its longest
    layers = make_layers(model, specs, backend, options, platform=platform, strict=strict, padded=True)
    device = model_device(model)
    if device is not None and any(site.causal for _, _, site in sites):
        first = next(iter(layers.values()))
        try:
            impl = first.impl_for(device)
        except ValueError:
            impl = None  # a device no platform serves (meta): checked on first call
        if impl is not None and not impl.supports_causal:
            raise ValueError(
                f"backend {backend.name!r} ({impl.description}) has no causal attention; {family.name} needs it"
            )
    return TransformersModelPatch(model, backend.name, layers, {path: module for path, module, _ in sites})


def register_all() -> None:
    """Register every backend's attention function with transformers (idempotent)."""
    for name in backend_names(sparse=False):
        register_implementation(name)
