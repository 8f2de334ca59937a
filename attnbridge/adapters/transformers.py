"""Patch transformers LLMs (Qwen3-MoE) through ``AttentionInterface``.

One attention function, registered as ``attnbridge_<backend>``, serves every patched model: it looks
up the :class:`AttentionLayer` stored on the attention module it is called with. The same name is
registered in ``AttentionMaskInterface`` with the SDPA mask builder, so padding masks are still
made (transformers makes no mask for names it does not know, which would silently ignore padding).

Calls without a mask (no padding: prefill and decode) go through the backend with ``causal=True``.
Calls with a mask (padded batches, sliding windows) or with dropout run transformers' own SDPA
attention, exactly what the unpatched model runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbridge.adapters.layers import make_layers, model_device
from attnbridge.attention.api import AttentionLayer
from attnbridge.attention.contract import AttentionContext
from attnbridge.attention.registry import BackendSpec
from attnbridge.models import ModelFamily

logger = logging.getLogger("attnbridge")

#: Attribute on each patched attention module holding its AttentionLayer.
LAYER_ATTR = "_attnbridge_layer"
_warned_masked: set[str] = set()


def implementation_name(backend: str) -> str:
    return f"attnbridge_{backend}"


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
    if attention_mask is not None or dropout:
        return _masked_fallback(
            module, layer, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs
        )

    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = bool(is_causal) and q_len > 1
    if causal and kv_len > q_len:
        # Same as transformers' SDPA path: with no mask this is a prefill into an empty static cache,
        # whose real keys are the first q_len (SDPA's is_causal is top-left aligned).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    context = AttentionContext(kind="self", layer_name=layer.name, extra={"causal": causal})
    out = layer(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=causal,
        scale=scaling,
        context=context,
    )
    return out, None


def _masked_fallback(module, layer, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if layer.name not in _warned_masked:
        _warned_masked.add(layer.name)
        logger.warning(
            "%s: attention with a mask (padded batch or sliding window) runs through transformers' SDPA, "
            "not backend %r; unmasked calls still use %r",
            layer.name,
            layer.backend,
            layer.backend,
        )
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def register_implementation(backend: str) -> str:
    """Register our attention function (and the SDPA mask builder) under ``attnbridge_<backend>``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = implementation_name(backend)
    AttentionInterface.register(name, attnbridge_attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every config object whose ``_attn_implementation`` ``set_attn_implementation`` may touch."""
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
    return list(seen.values())


def _read_implementation(config: Any) -> Any:
    return getattr(config, "_attn_implementation_internal", None)


def _write_implementation(config: Any, value: Any) -> None:
    config._attn_implementation_internal = value


@contextlib.contextmanager
def attn_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name`` (already registered) for one block of
    code; every config's previous value is restored afterwards, also on error."""
    saved = [(config, _read_implementation(config)) for config in _configs(model)]
    try:
        for config, _ in saved:
            _write_implementation(config, name)
        yield
    finally:
        for config, value in saved:
            _write_implementation(config, value)


@dataclass
class TransformersModelPatch:
    """Our layers on a transformers model's attention modules and its attn implementation switched."""

    model: torch.nn.Module
    backend: str
    layers: dict[str, AttentionLayer]
    modules: dict[str, torch.nn.Module]
    originals: dict[int, tuple[Any, Any]] = field(default_factory=dict)

    def apply(self) -> None:
        self.originals = {id(c): (c, _read_implementation(c)) for c in _configs(self.model)}
        name = register_implementation(self.backend)
        for path, module in self.modules.items():
            setattr(module, LAYER_ATTR, self.layers[path])
        try:
            self.model.set_attn_implementation(name)
            if self.model.config._attn_implementation != name:
                raise ValueError(
                    f"{type(self.model).__name__} did not accept attn_implementation {name!r} "
                    "(its attention does not go through transformers' AttentionInterface)"
                )
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        for config, value in self.originals.values():
            _write_implementation(config, value)
        self.originals = {}
        for module in self.modules.values():
            if LAYER_ATTR in module.__dict__:
                delattr(module, LAYER_ATTR)


def plan_transformers_model(
    model: torch.nn.Module,
    family: ModelFamily,
    spec: BackendSpec,
    config: dict[str, Any],
    *,
    platform: str | None,
    strict: bool,
) -> TransformersModelPatch:
    """Check the model and build its layers, changing nothing yet."""
    if spec.sparse:
        raise ValueError(
            f"backend {spec.name!r} is a sparse video/image backend (it needs a latent token grid); "
            f"{type(model).__name__} is a causal LM: use a dense backend (sdpa, fa, sage, laser)"
        )
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"{type(model).__name__} has no set_attn_implementation; attnbridge needs transformers >= 5"
        )
    sites = family.attention_modules(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__}: found no attention modules matching "
            f"{[s.pattern for s in family.attention_sites]}; this transformers version is not supported"
        )
    device = model_device(model)
    layers = make_layers(
        [(path, site.kind) for path, _, site in sites],
        spec,
        config,
        platform=platform,
        strict=strict,
        device=device,
    )
    if device is not None and any(site.causal for _, _, site in sites):
        first = next(iter(layers.values()))
        try:
            impl = first.impl_for(device)
        except ValueError:
            impl = None  # a device no platform serves (meta): checked on first call
        if impl is not None and not impl.supports_causal:
            raise ValueError(
                f"backend {spec.name!r} ({impl.kernel}) has no causal attention; {family.name} needs it"
            )
    return TransformersModelPatch(model, spec.name, layers, {path: module for path, module, _ in sites})
