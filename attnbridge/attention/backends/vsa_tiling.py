"""Tiling for video sparse attention: the latent token grid cut into 4x4x4 tiles of 64 tokens.

Everything here is built once per ``(grid, device)`` and cached, so a denoising loop pays for the
index tensors once: :func:`tile_layout` returns a :class:`TileLayout` holding every index VSA needs
and the tile buffer that all VSA layers of a step write into, reallocated only when the shape, dtype
or device of what is tiled changes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from attnbridge.attention.registry import check_sparsity, kept_count

#: Tile extent in (t, h, w) latent tokens.
TILE_SIZE: tuple[int, int, int] = (4, 4, 4)
#: Tokens in a full tile; also the block size of the fine (block-sparse) stage.
TILE_TOKENS: int = math.prod(TILE_SIZE)


def topk_tiles(sparsity: float, n_tiles: int) -> int:
    """Key tiles each query tile keeps: ``ceil((1 - sparsity) * n_tiles)``, in ``[1, n_tiles]``."""
    return kept_count(check_sparsity("vsa", sparsity), n_tiles)


def tile_counts(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tiles along (t, h, w); edge tiles are partial."""
    return tuple(-(-dim // size) for dim, size in zip(grid, TILE_SIZE))  # type: ignore[return-value]


@dataclass(eq=False)
class TileLayout:
    """The index tensors of one latent grid on one device, and the reusable tile buffer.

    Padded layout: tile ``i`` occupies slots ``[64 i, 64 i + 64)``, tokens in raster (t, h, w) order
    inside the tile, tiles in raster order over the tile grid; a partial tile's missing tokens are
    pad slots that hold zeros.
    """

    grid: tuple[int, int, int]
    device: torch.device
    num_tiles: tuple[int, int, int]
    #: ``[S]`` original token indices in tiled order (gather ``x[:, tile_partition_indices]``).
    tile_partition_indices: torch.Tensor
    #: ``[S]`` argsort of the above: tiled position of each original token.
    reverse_tile_partition_indices: torch.Tensor
    #: ``[S]`` padded slots that hold a real token, in tiled order.
    non_pad_index: torch.Tensor
    #: ``[S]`` ``non_pad_index[reverse_tile_partition_indices]``: the padded slot of each original
    #: token, so untiling is one gather and tiling one scatter.
    untile_combined_index: torch.Tensor
    #: ``[S]`` tile of each original token (``untile_combined_index // 64``).
    token_tile_index: torch.Tensor
    #: ``[n_tiles]`` int32 real tokens per tile.
    variable_block_sizes: torch.Tensor
    #: ``[n_tiles * 64]`` bool, False at pad slots (pad keys must get no attention weight).
    key_valid: torch.Tensor
    #: Reused by :meth:`tile`; see there.
    tile_buf: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_tiles(self) -> int:
        return math.prod(self.num_tiles)

    @property
    def total_seq_length(self) -> int:
        return math.prod(self.grid)

    @property
    def padded_length(self) -> int:
        return self.n_tiles * TILE_TOKENS

    def buffer(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The padded ``[batch, n_tiles * 64, heads, head_dim]`` buffer, reused while shape, dtype and
        device match and zero-allocated otherwise. Its pad slots are never written, so they stay zero.

        The buffer is shared by every VSA call on this grid: what was tiled into it must be consumed
        before the next call tiles (true for sequential layers on one stream).
        """
        shape = (batch, self.padded_length, heads, head_dim)
        buf = self.tile_buf
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != self.device:
            buf = torch.zeros(shape, dtype=dtype, device=self.device)
            self.tile_buf = buf
        return buf

    def tile_into(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Scatter ``x`` ``[B, S, ...]`` (original token order) into the real slots of padded ``out``.

        One ``index_copy_`` through the combined index instead of a gather followed by a scatter.
        """
        if x.shape[1] != self.total_seq_length:
            raise ValueError(
                f"backend 'vsa': sequence length {x.shape[1]} does not match the latent grid "
                f"{self.grid} ({self.total_seq_length} tokens)"
            )
        return out.index_copy_(1, self.untile_combined_index, x)

    def tile(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, S, H, D]`` in the reused tile buffer (aliased: consume before the next tile)."""
        buf = self.buffer(x.shape[0], x.shape[2], x.shape[3], x.dtype)
        return self.tile_into(buf, x)

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        """Padded ``[B, n_tiles * 64, ...]`` back to original token order ``[B, S, ...]``: one gather."""
        return x.index_select(1, self.untile_combined_index)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tile mean ``[B, n_tiles, ...]`` in float32 over the tile's real tokens (pads are zero)."""
        tiles = x.unflatten(1, (self.n_tiles, TILE_TOKENS)).sum(dim=2, dtype=torch.float32)
        sizes = self.variable_block_sizes.to(torch.float32)
        return tiles / sizes.view(1, -1, *([1] * (tiles.dim() - 2)))


def _build_layout(grid: tuple[int, int, int], device: torch.device) -> TileLayout:
    num_tiles = tile_counts(grid)
    padded = tuple(n * s for n, s in zip(num_tiles, TILE_SIZE))
    # Token id of every slot of the padded grid, -1 at pads, then regrouped tile by tile.
    ids = torch.full(padded, -1, dtype=torch.int64)
    ids[: grid[0], : grid[1], : grid[2]] = torch.arange(math.prod(grid)).view(grid)
    (nt, nh, nw), (st, sh, sw) = num_tiles, TILE_SIZE
    slots = ids.view(nt, st, nh, sh, nw, sw).permute(0, 2, 4, 1, 3, 5).reshape(-1)
    key_valid = slots >= 0
    tile_partition_indices = slots[key_valid]
    reverse = torch.argsort(tile_partition_indices)
    non_pad_index = torch.nonzero(key_valid).flatten()
    untile = non_pad_index[reverse]
    sizes = key_valid.view(-1, TILE_TOKENS).sum(dim=1, dtype=torch.int32)
    return TileLayout(
        grid=grid,
        device=device,
        num_tiles=num_tiles,
        tile_partition_indices=tile_partition_indices.to(device),
        reverse_tile_partition_indices=reverse.to(device),
        non_pad_index=non_pad_index.to(device),
        untile_combined_index=untile.to(device),
        token_tile_index=(untile // TILE_TOKENS).to(device),
        variable_block_sizes=sizes.to(device),
        key_valid=key_valid.to(device),
    )


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=8)
def _cached_layout(grid: tuple[int, int, int], device: torch.device) -> TileLayout:
    return _build_layout(grid, device)


def tile_layout(grid: tuple[int, int, int], device: torch.device | str) -> TileLayout:
    """The cached :class:`TileLayout` of ``grid`` ``(T, H, W)`` on ``device``."""
    grid = tuple(int(d) for d in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"backend 'vsa': grid must be three positive sizes (T, H, W); got {grid}")
    return _cached_layout(grid, _normalize_device(device))  # type: ignore[arg-type]


def clear_tile_layouts() -> None:
    """Drop every cached layout and its tile buffer (frees their memory)."""
    _cached_layout.cache_clear()
