"""Tiling for video sparse attention: the latent token grid cut into 4x4x4 tiles of 64 tokens. A
:class:`TileLayout`'s read-only index tensors are shared per grid and device (every shape follows from
the grid alone); the tile buffer belongs to one call (:meth:`TileLayout.new_buffer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnbridge.attention.options import kept_count
from attnbridge.attention.sparse.layout import cached_in_eager

#: Tile extent in (t, h, w) latent tokens.
TILE_SIZE: tuple[int, int, int] = (4, 4, 4)
#: Tokens in a full tile; also the block size of the fine (block-sparse) stage.
TILE_TOKENS: int = math.prod(TILE_SIZE)


def topk_tiles(sparsity: float, n_tiles: int) -> int:
    """Key tiles each query tile keeps: ``ceil((1 - sparsity) * n_tiles)``, in ``[1, n_tiles]``."""
    return kept_count(sparsity, n_tiles)


def tile_counts(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tiles along (t, h, w); edge tiles are partial."""
    return tuple(-(-dim // size) for dim, size in zip(grid, TILE_SIZE))  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class TileLayout:
    """Padded layout: tile ``i`` occupies slots ``[64 i, 64 i + 64)``, tokens and tiles in raster (t, h, w)
    order; a partial tile's missing tokens are pad slots, which hold zeros."""

    grid: tuple[int, int, int]
    num_tiles: tuple[int, int, int]
    #: ``[S]`` the padded slot of each original token: tiling is one scatter, untiling one gather.
    untile_combined_index: torch.Tensor
    #: ``[S]`` tile of each original token.
    token_tile_index: torch.Tensor
    #: ``[n_tiles]`` int32 real tokens per tile.
    variable_block_sizes: torch.Tensor
    #: ``[n_tiles * 64]`` bool, False at pad slots (pad keys must get no attention weight).
    key_valid: torch.Tensor
    #: The pad slots.
    pad_slots: torch.Tensor

    @property
    def n_tiles(self) -> int:
        return math.prod(self.num_tiles)

    @property
    def total_seq_length(self) -> int:
        return math.prod(self.grid)

    @property
    def padded_length(self) -> int:
        return self.n_tiles * TILE_TOKENS

    def new_buffer(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """A fresh ``[batch, n_tiles * 64, heads, head_dim]`` buffer, pad slots zeroed."""
        device = self.key_valid.device
        buf = torch.empty(batch, self.padded_length, heads, head_dim, dtype=dtype, device=device)
        return buf.index_fill_(1, self.pad_slots, 0)

    def tile_into(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Scatter ``x`` ``[B, S, ...]`` (original token order) into the real slots of padded ``out``."""
        if x.shape[1] != self.total_seq_length:
            raise ValueError(
                f"backend 'vsa': sequence length {x.shape[1]} does not match the latent grid "
                f"{self.grid} ({self.total_seq_length} tokens)"
            )
        return out.index_copy_(1, self.untile_combined_index, x)

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        """Padded ``[B, n_tiles * 64, ...]`` back to original token order ``[B, S, ...]``."""
        return x.index_select(1, self.untile_combined_index)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tile mean ``[B, n_tiles, ...]`` in float32 over the tile's real tokens (pads are zero)."""
        tiles = x.unflatten(1, (self.n_tiles, TILE_TOKENS)).sum(dim=2, dtype=torch.float32)
        sizes = self.variable_block_sizes.to(torch.float32)
        return tiles / sizes.view(1, -1, *([1] * (tiles.dim() - 2)))


def _coords(index: torch.Tensor, counts: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Raster ``index`` over a ``counts`` grid -> its (t, h, w) coordinates."""
    _, nh, nw = counts
    return index // (nh * nw), (index // nw) % nh, index % nw


@cached_in_eager
def tile_layout(grid: tuple[int, int, int], device: torch.device) -> TileLayout:
    """The :class:`TileLayout` of ``grid`` ``(T, H, W)`` on ``device``, by index arithmetic alone."""
    grid = tuple(int(d) for d in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"backend 'vsa': grid must be three positive sizes (T, H, W); got {grid}")
    num_tiles = tile_counts(grid)
    n_tiles = math.prod(num_tiles)
    device = torch.device(device)
    token_t, token_h, token_w = _coords(torch.arange(math.prod(grid), device=device), grid)
    size_t, size_h, size_w = TILE_SIZE
    tile = ((token_t // size_t) * num_tiles[1] + token_h // size_h) * num_tiles[2] + token_w // size_w
    offset = ((token_t % size_t) * size_h + token_h % size_h) * size_w + token_w % size_w
    slots = torch.arange(n_tiles * TILE_TOKENS, device=device)
    tile_t, tile_h, tile_w = _coords(slots // TILE_TOKENS, num_tiles)
    in_t, in_h, in_w = _coords(slots % TILE_TOKENS, TILE_SIZE)
    valid = (
        (tile_t * size_t + in_t < grid[0])
        & (tile_h * size_h + in_h < grid[1])
        & (tile_w * size_w + in_w < grid[2])
    )
    return TileLayout(
        grid=grid,
        num_tiles=num_tiles,
        untile_combined_index=tile * TILE_TOKENS + offset,
        token_tile_index=tile,
        variable_block_sizes=valid.view(n_tiles, TILE_TOKENS).sum(dim=1, dtype=torch.int32),
        key_valid=valid,
        # No data-dependent shape: the number of pad slots follows from the grid.
        pad_slots=torch.argsort(valid.to(torch.int8), stable=True)[: valid.numel() - math.prod(grid)],
    )
