"""The ``vsa`` backend: Video Sparse Attention (FastVideo's algorithm) for video DiTs such as Wan.

Self-attention over a latent grid ``(T, H, W)`` runs in three stages on tokens regrouped into 4x4x4
tiles (see :mod:`attnbridge.attention.sparse.vsa_tiling`):

1. **coarse**: dense attention between the tiles' mean-pooled q, k, v. Its output is broadcast to
   every token of the query tile; its scores pick each query tile's ``topk`` key tiles.
2. **fine**: exact block-sparse attention over those tiles (64-token blocks, pad keys masked), through
   the block-sparse kernel shared with ``block_sparse`` (Triton on CUDA, FlexAttention on the CPU).
3. ``out = fine + coarse`` (``coarse * gate`` when the caller passes ``context.gate``, the learned
   ``to_gate_compress`` of FastWan checkpoints), back in the original token order.

Cross-attention (or ``S_q != S_kv``) and calls without a grid run the platform's dense ``fa`` kernel;
joint text+video models are refused at enable time (VSA tiles video tokens only).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import torch

from attnbridge.attention.contract import default_scale, repeat_kv_heads
from attnbridge.attention.options import flag, fraction, option, optional_fraction
from attnbridge.attention.registry import Backend, DenseFallbackImpl, Unavailable
from attnbridge.attention.sparse import flex, triton_kernel
from attnbridge.attention.sparse.platforms import NO_MUSA
from attnbridge.attention.sparse.vsa_tiling import (
    TILE_SIZE,
    TILE_TOKENS,
    TileLayout,
    tile_counts,
    tile_layout,
    topk_tiles,
)
from attnbridge.notices import logger, warn_once


@dataclasses.dataclass(frozen=True)
class VSAOptions:
    """Options of ``vsa``; ``VSA_sparsity`` (sglang's name) wins over ``sparsity`` when given."""

    sparsity: float = option(0.875, "fraction of key tiles each query tile skips, in [0, 1)", fraction)
    VSA_sparsity: float | None = option(
        None,
        "sglang's name for vsa's `sparsity`; wins over `sparsity` when both are given",
        optional_fraction,
    )
    fastvideo_kernel: bool = option(
        False,
        "True: run FastVideo's fused `vsa` kernel instead of the block-sparse path where it imports "
        "(CUDA, default scale only)",
        flag,
    )

    @property
    def effective_sparsity(self) -> float:
        return self.sparsity if self.VSA_sparsity is None else self.VSA_sparsity


def tile_qkv(layout: TileLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v tiled side by side along heads in one buffer of this call; returns three views."""
    hq, hkv = q.shape[2], k.shape[2]
    buf = layout.new_buffer(q.shape[0], hq + 2 * hkv, q.shape[3], q.dtype)
    qt, kt, vt = buf.split([hq, hkv, hkv], dim=2)
    for tiled, x in ((qt, q), (kt, k), (vt, v)):
        layout.tile_into(tiled, x)
    return qt, kt, vt


def coarse_attention(
    layout: TileLayout, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, *, scale: float, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float32 attention between mean-pooled tiles: output ``[B, n_tiles, H_q, D]`` float32 and each
    query tile's ``topk`` key tiles by coarse score, int32 ``[B, H_q, n_tiles, topk]``."""
    q_bar, k_bar, v_bar = (layout.pool(x).transpose(1, 2) for x in (qt, kt, vt))
    k_bar, v_bar = repeat_kv_heads(q_bar, k_bar, v_bar, head_dim=1)
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
    """Exact attention of each query tile over its key tiles, pad keys masked; tiled BSHD in and out
    (rows at pad slots hold garbage, which untiling drops)."""
    kv_counts = torch.full(kv_indices.shape[:-1], kv_indices.shape[-1], dtype=torch.int32, device=qt.device)
    kernel = triton_kernel.block_sparse_attention if qt.is_cuda else flex.block_sparse_attention
    return kernel(
        qt, kt, vt, kv_indices, kv_counts, block_size=TILE_TOKENS, scale=scale, key_valid=layout.key_valid
    )


def combine(
    layout: TileLayout, fine: torch.Tensor, coarse: torch.Tensor, gate: torch.Tensor | None
) -> torch.Tensor:
    """``fine + coarse`` (``* gate``) in original token order and ``fine``'s dtype. Untiling first measured
    faster on an H200 than broadcasting the coarse rows over the padded tiles."""
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
    k, v = repeat_kv_heads(q, k, v)
    qt, kt, vt = tile_qkv(layout, q, k, v)
    gate_t = None
    if gate is not None:
        padded = layout.new_buffer(q.shape[0], q.shape[2], q.shape[3], q.dtype)
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


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    return len(shape) <= len(target) and all(n in (1, t) for n, t in zip(reversed(shape), reversed(target)))


class VSAImpl(DenseFallbackImpl):
    """VSA with the block-sparse fine stage (CUDA and CPU)."""

    description = "block-sparse attention over 4x4x4 tiles (64-token blocks) + pooled coarse attention"
    supported_head_sizes = (64, 128)
    supports_lse = False
    supports_causal = False
    attention_kinds = ("self", "cross")

    @staticmethod
    def _runs_dense(q, k, context) -> bool:
        return context is None or context.kind == "cross" or context.grid is None or q.shape[1] != k.shape[1]

    def kept_fraction(self, q, k, context) -> float | None:
        """The fraction of key tiles each query tile attends in the fine stage (None: a dense call)."""
        if self._runs_dense(q, k, context):
            return None
        n_tiles = math.prod(tile_counts(tuple(context.grid)))
        return topk_tiles(self.options.effective_sparsity, n_tiles) / n_tiles

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        if self._runs_dense(q, k, context):
            return self.dense(q, k, v, causal=causal, scale=scale, return_lse=return_lse, context=context)
        if context.kind == "joint" and context.num_text_tokens or context.key_lengths is not None:
            raise ValueError(
                "backend 'vsa' runs self-attention over video tokens only; this call has text tokens or "
                "key padding (use 'block_sparse' or 'rain_fusion')"
            )
        gate = context.gate
        if gate is not None and not _broadcasts_to(gate.shape, q.shape):
            raise ValueError(
                f"backend 'vsa': gate {tuple(gate.shape)} does not broadcast to q {tuple(q.shape)}"
            )
        layout = tile_layout(tuple(context.grid), q.device)
        topk = topk_tiles(self.options.effective_sparsity, layout.n_tiles)
        if self.options.fastvideo_kernel:
            kernel = load_fastvideo_kernel() if q.is_cuda and scale is None else None
            if kernel is not None:
                return fastvideo_attention(kernel, q, k, v, layout, topk=topk, gate=gate)
            warn_once(
                "backend 'vsa': fastvideo_kernel=True but FastVideo's kernel cannot run here "
                "(needs CUDA, the default scale and the `vsa` package); using the block-sparse path"
            )
        return vsa_attention(q, k, v, layout, topk=topk, scale=default_scale(q.shape[-1], scale), gate=gate)


class VSACudaImpl(VSAImpl):
    """VSA whose fine stage runs attnbridge's Triton block-sparse kernel."""

    install = (triton_kernel.TRITON_INSTALL,)

    @classmethod
    def check_available(cls, platform: str) -> None:
        triton_kernel.check_triton(platform)


BACKEND = Backend(
    "vsa",
    "video sparse attention over 4x4x4 tiles",
    platforms={
        "cpu": VSAImpl,
        "cuda": VSACudaImpl,
        "musa": NO_MUSA,
        "npu": Unavailable(
            "no Ascend kernel for video sparse attention; use 'block_sparse' or 'rain_fusion'"
        ),
    },
    options=VSAOptions,
    sparse=True,
    order=6,
)
