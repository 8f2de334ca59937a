"""The ``vsa`` backend: Video Sparse Attention (FastVideo's algorithm) for video DiTs such as Wan.

Self-attention over a latent grid ``(T, H, W)`` runs in three stages on tokens regrouped into 4x4x4
tiles (see :mod:`attnbridge.attention.backends.vsa_tiling`):

1. **coarse**: dense attention between the tiles' mean-pooled q, k, v. Its output is broadcast to
   every token of the query tile; its scores pick each query tile's ``topk`` key tiles.
2. **fine**: exact block-sparse attention over those tiles (64-token blocks, pad keys masked), through
   the FlexAttention path shared with the ``block_sparse`` backend.
3. ``out = fine + coarse`` (``coarse * gate`` when the caller passes ``context.extra["vsa_gate"]``,
   the learned ``to_gate_compress`` of FastWan checkpoints), back in the original token order.

Cross-attention (or ``S_q != S_kv``) and calls without a grid run the platform's dense ``fa`` kernel;
joint text+video calls are a ValueError (VSA tiles video tokens only).
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from attnbridge.attention.backends.sparse_common import dense_fa_impl
from attnbridge.attention.backends.vsa_tiling import (
    TILE_SIZE,
    TILE_TOKENS,
    TileLayout,
    tile_counts,
    tile_layout,
    topk_tiles,
)
from attnbridge.attention.contract import (
    AttentionContext,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    default_scale,
)
from attnbridge.attention.registry import check_sparsity

logger = logging.getLogger("attnbridge")

#: Key of the optional compress-branch gate (BSHD, like q) in ``AttentionContext.extra``.
GATE_KEY = "vsa_gate"


def sparsity_from_config(config: dict[str, Any]) -> float:
    """``VSA_sparsity``, else ``sparsity``, else 0 (sglang's precedence), checked to be in [0, 1)."""
    key = "VSA_sparsity" if config.get("VSA_sparsity") is not None else "sparsity"
    value = config.get(key)
    return check_sparsity("vsa", 0.0 if value is None else value, key=key)


@dataclass
class VSAMetadata(AttentionMetadata):
    """What one VSA call needs besides q/k/v: the grid and the top-k; indices live in the layout."""

    grid: tuple[int, int, int]
    sparsity: float
    topk: int

    def layout(self, device: torch.device) -> TileLayout:
        return tile_layout(self.grid, device)


@functools.lru_cache(maxsize=32)
def _metadata(grid: tuple[int, int, int], sparsity: float) -> VSAMetadata:
    n_tiles = 1
    for count in tile_counts(grid):
        n_tiles *= count
    return VSAMetadata(grid=grid, sparsity=sparsity, topk=topk_tiles(sparsity, n_tiles))


class VSAMetadataBuilder(AttentionMetadataBuilder):
    """Metadata per latent grid and sparsity (cached); ``None`` where VSA does not apply."""

    def build(self, context: AttentionContext, **config: Any) -> VSAMetadata | None:
        if context.kind == "cross" or context.grid is None:
            return None
        grid = tuple(int(d) for d in context.grid)
        return _metadata(grid, sparsity_from_config(config))  # type: ignore[arg-type]


def tile_qkv(layout: TileLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v tiled side by side along heads in the layout's reused buffer; returns three views."""
    hq, hkv = q.shape[2], k.shape[2]
    buf = layout.buffer(q.shape[0], hq + 2 * hkv, q.shape[3], q.dtype)
    qt, kt, vt = buf.split([hq, hkv, hkv], dim=2)
    for tiled, x in ((qt, q), (kt, k), (vt, v)):
        layout.tile_into(tiled, x)
    return qt, kt, vt


def coarse_attention(
    layout: TileLayout, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, *, scale: float, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention between mean-pooled tiles, in float32.

    Returns the coarse output ``[B, n_tiles, H_q, D]`` float32 and the ``topk`` key tiles of each
    query tile by coarse score, int32 ``[B, H_q, n_tiles, topk]``.
    """
    groups = qt.shape[2] // kt.shape[2]
    q_bar, k_bar, v_bar = (layout.pool(x).transpose(1, 2) for x in (qt, kt, vt))
    if groups > 1:
        k_bar, v_bar = k_bar.repeat_interleave(groups, dim=1), v_bar.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q_bar, k_bar.transpose(-1, -2)) * scale
    out = torch.matmul(torch.softmax(scores, dim=-1), v_bar).transpose(1, 2)
    kv_indices = scores.topk(topk, dim=-1, sorted=False).indices.to(torch.int32)
    return out, kv_indices


def fine_attention(
    layout: TileLayout,
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """Exact attention of each query tile over its selected key tiles; pad keys get no weight.

    Tiled BSHD in and out (rows at pad slots are garbage the untile drops).
    """
    from attnbridge.attention.backends.flex_block_sparse import block_sparse_attention

    kv_counts = torch.full(kv_indices.shape[:-1], kv_indices.shape[-1], dtype=torch.int32, device=qt.device)
    return block_sparse_attention(
        qt, kt, vt, kv_indices, kv_counts, block_size=TILE_TOKENS, scale=scale, key_valid=layout.key_valid
    )


def combine(
    layout: TileLayout, fine: torch.Tensor, coarse: torch.Tensor, gate: torch.Tensor | None
) -> torch.Tensor:
    """``fine + coarse`` (``fine + coarse * gate``) in the original token order, in ``fine``'s dtype.

    Untiling first and adding each token's gathered coarse row measured faster on an H200 than
    broadcasting the coarse rows over the padded tiles in place.
    """
    out = layout.untile(fine)
    coarse_tok = coarse.to(fine.dtype).index_select(1, layout.token_tile_index)
    return out.add_(coarse_tok) if gate is None else out.addcmul_(coarse_tok, gate)


def vsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TileLayout,
    *,
    topk: int,
    scale: float,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """VSA on BSHD tensors in original token order; ``topk`` key tiles per query tile."""
    qt, kt, vt = tile_qkv(layout, q, k, v)
    coarse, kv_indices = coarse_attention(layout, qt, kt, vt, scale=scale, topk=topk)
    fine = fine_attention(layout, qt, kt, vt, kv_indices, scale=scale)
    return combine(layout, fine, coarse, gate)


@functools.cache
def load_fastvideo_kernel():
    """FastVideo's ``vsa.video_sparse_attn`` if that package imports (it needs CUDA 12), else None."""
    try:
        return importlib.import_module("vsa").video_sparse_attn
    except Exception as error:  # an ImportError, or an OSError for a missing libcudart
        logger.debug("vsa: FastVideo kernel package unavailable (%s)", error)
        return None


def fastvideo_attention(
    kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TileLayout,
    *,
    topk: int,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same computation through FastVideo's fused kernel (BHSD tiled in and out, 1/sqrt(D) scale)."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    qt, kt, vt = tile_qkv(layout, q, k, v)
    gate_t = None
    if gate is not None:
        padded = torch.zeros((q.shape[0], layout.padded_length, *q.shape[2:]), dtype=q.dtype, device=q.device)
        gate_t = layout.tile_into(padded, gate.expand_as(q)).transpose(1, 2)
    out = kernel(
        qt.transpose(1, 2),
        kt.transpose(1, 2),
        vt.transpose(1, 2),
        variable_block_sizes=layout.variable_block_sizes,
        topk=topk,
        block_size=TILE_SIZE,
        compress_attn_weight=gate_t,
    )
    return layout.untile(out.transpose(1, 2))


class FlexVSAImpl(AttentionImpl):
    """VSA with the FlexAttention block-sparse fine stage (CUDA and CPU).

    Config: ``sparsity`` / ``VSA_sparsity`` in [0, 1) (default 0: every key tile kept),
    ``fastvideo_kernel=True`` to run FastVideo's fused ``vsa`` kernel instead where it imports (CUDA,
    default scale only).
    """

    kernel = "FlexAttention block-sparse over 4x4x4 tiles (64-token blocks) + pooled coarse attention"
    supported_head_sizes = (64, 128)
    supports_lse = False
    supports_causal = False
    # Joint text + video sequences (Qwen-Image) are refused at enable time: VSA tiles video tokens only.
    attention_kinds = ("self", "cross")

    def __init__(self, backend_name: str = "", **config: Any) -> None:
        super().__init__(backend_name or "vsa", **config)
        self.sparsity = sparsity_from_config(config)
        self.use_fastvideo = bool(config.get("fastvideo_kernel", False))
        self._fastvideo_refusal_logged = False
        self._builder = VSAMetadataBuilder()

    def make_metadata_builder(self) -> AttentionMetadataBuilder:
        return VSAMetadataBuilder()

    def dense_impl(self, device: torch.device) -> AttentionImpl:
        """The platform's ``fa`` kernel, for the calls VSA does not apply to."""
        return dense_fa_impl(device)

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        if (context is not None and context.kind == "cross") or q.shape[1] != k.shape[1]:
            metadata = None
        elif metadata is None and context is not None:
            metadata = self._builder.build(context, **self.config)
        if metadata is None:
            return self.dense_impl(q.device).forward(
                q, k, v, causal=causal, scale=scale, return_lse=return_lse, context=context
            )
        if context is not None and context.kind == "joint" and context.num_text_tokens:
            raise ValueError(
                "backend 'vsa' runs self-attention over video tokens only; this joint call has "
                f"{context.num_text_tokens} text tokens (use 'block_sparse' or 'rain_fusion')"
            )
        if not isinstance(metadata, VSAMetadata):
            raise TypeError(f"backend 'vsa' needs VSAMetadata, got {type(metadata).__name__}")
        gate = None if context is None else context.extra.get(GATE_KEY)
        if gate is not None and torch.broadcast_shapes(gate.shape, q.shape) != q.shape:
            raise ValueError(
                f"backend 'vsa': gate {tuple(gate.shape)} does not broadcast to q {tuple(q.shape)}"
            )
        layout = metadata.layout(q.device)
        if self.use_fastvideo:
            kernel = load_fastvideo_kernel() if q.is_cuda and scale is None else None
            if kernel is not None:
                return fastvideo_attention(kernel, q, k, v, layout, topk=metadata.topk, gate=gate)
            if not self._fastvideo_refusal_logged:
                self._fastvideo_refusal_logged = True
                logger.warning(
                    "backend 'vsa': fastvideo_kernel=True but FastVideo's kernel cannot run here "
                    "(needs CUDA, the default scale and the `vsa` package); using the FlexAttention path"
                )
        return vsa_attention(
            q, k, v, layout, topk=metadata.topk, scale=default_scale(q.shape[-1], scale), gate=gate
        )
