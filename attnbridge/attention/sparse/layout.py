"""The token layout a block mask is built over, and the rules every block-mask backend follows.

* **Dense steps.** Steps ``step < skip_first_steps`` (or a context with ``dense_step=True``) run the
  platform's dense ``fa`` kernel, so the output is exactly the dense output. A context without a
  step counts as past the dense steps.
* **Dense calls.** Cross-attention (``context.kind == "cross"`` or ``S_q != S_kv``), a bare call
  without a context (ring-attention hops make those) and an LSE request the sparse kernel cannot
  answer run dense ``fa``.
* **Joint attention** (image tokens first, then ``num_text_tokens`` text tokens): image blocks stay
  aligned to block boundaries and the text lands in the last blocks. Every block that holds a text
  token is a dense row (text queries see everything) and a dense column (every query sees all text).
* **First frame** (``rain_fusion``; ``block_sparse`` forces no first-frame block and keeps one when
  its estimated mass earns it). With a video grid (``T > 1``) the first latent frame's
  ``ceil(H*W/block)`` blocks are dense rows and dense columns. A single-frame grid (an image) has
  no first frame to protect: applying the rule there would make the whole image dense.
* **Token order.** A backend may gather the image tokens into another order first (RainFusion's
  8x8 patches); the output is put back in the caller's order.
* **Key padding** (``context.key_lengths``, the text padding of a batch of prompts): padded keys get
  no weight and key blocks holding only padding are never selected. A call whose image tokens a
  backend reorders runs dense ``fa`` when it has padding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnbridge.attention.contract import AttentionContext
from attnbridge.attention.sparse.graphs import replayed
from attnbridge.attention.sparse.selection import BlockSelection

#: Tokens per block of every block mask here (the Ascend kernels' ``sparse_size``).
BLOCK_SIZE = 128


def cached_in_eager(fn: Callable) -> Callable:
    """``fn`` memoized on its (hashable) arguments in eager mode, traced afresh under
    ``torch.compile``. What it returns is shared: never write to it."""
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


_compiled: dict[tuple[Callable, str], Callable] = {}


def compiled_on_gpu(fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled once (``dynamic=False``) for accelerator tensors in eager mode, as is on the CPU and
    under a caller's ``torch.compile``: block selection's dozen small ops fuse into a few kernels, which
    on CUDA replay as one graph (:mod:`.graphs`)."""
    if device.type == "cpu" or torch.compiler.is_compiling():
        return fn
    compiled = _compiled.get((fn, device.type))
    if compiled is None:
        compiled = torch.compile(fn, dynamic=False)
        if device.type == "cuda":
            compiled = replayed(compiled)
        _compiled[fn, device.type] = compiled
    return compiled


def is_dense_step(context: AttentionContext | None, skip_first_steps: int) -> bool:
    """Whether the call belongs to a denoising step that runs dense."""
    if context is None:
        return False
    return context.dense_step or (context.step is not None and context.step < skip_first_steps)


@dataclass(frozen=True)
class SparseLayout:
    """How one self/joint call maps onto the block mask. ``perm`` (None: no reordering) gathers the image
    tokens into the backend's order, text staying last; ``inverse`` puts them back."""

    seq_len: int
    num_text: int
    grid: tuple[int, int, int]
    first_frame_blocks: int
    block_size: int = BLOCK_SIZE
    perm: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    #: Valid keys per sample (int ``[B]``), the keys after them being padding; None: no padding.
    key_lengths: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.seq_len / self.block_size)

    @property
    def text_start_block(self) -> int:
        """First block holding a text token (``num_blocks`` when there is no text)."""
        if self.num_text == 0:
            return self.num_blocks
        return (self.seq_len - self.num_text) // self.block_size

    def select(self, lists: Callable, q, k, scale: float, *params):
        """The kept blocks from ``lists(q, k, scale, *params, block_size, key_lengths)`` -> (indices, counts,
        mask), compiled on GPUs (:func:`compiled_on_gpu`)."""
        select = compiled_on_gpu(lists, q.device)
        indices, counts, mask = select(q, k, scale, *params, self.block_size, self.key_lengths)
        return BlockSelection(indices, counts, self.num_blocks, kept_mask=mask)

    def to_mask_order(self, x: torch.Tensor) -> torch.Tensor:
        """BSHD tokens in the caller's order -> mask order."""
        return x if self.perm is None else x.index_select(1, self.perm)

    def from_mask_order(self, x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """Output (BSHD, or LSE with ``seq_dim=2``) in mask order -> the caller's order."""
        return x if self.inverse is None else x.index_select(seq_dim, self.inverse)


def dense_block_flags(
    num_blocks: int, first_frame_blocks: int, text_start_block: int, device
) -> torch.Tensor:
    """Bool ``[num_blocks]``: True for the first-frame blocks and the blocks from ``text_start_block``."""
    blocks = torch.arange(num_blocks, device=device)
    return (blocks < first_frame_blocks) | (blocks >= text_start_block)


def resolve_layout(
    backend: str,
    q: torch.Tensor,
    context: AttentionContext | None,
    image_order: Callable[[tuple[int, int, int]], torch.Tensor | None] | None = None,
    block_size: int = BLOCK_SIZE,
) -> SparseLayout:
    """The checked mask-order layout of this call. ``image_order`` (module-level, as it keys a cache) maps
    the grid to the gather order of the image tokens, or None for raster order."""
    seq_len = q.shape[1]
    num_text = context.num_text_tokens if context is not None and context.kind == "joint" else 0
    num_image = seq_len - num_text
    if num_text < 0 or num_image <= 0:
        raise ValueError(
            f"backend {backend!r}: joint attention with {num_text} text tokens does not fit a sequence "
            f"of {seq_len} tokens"
        )
    grid = context.grid if context is not None and context.grid is not None else (1, 1, num_image)
    grid = tuple(int(n) for n in grid)
    if math.prod(grid) != num_image:
        raise ValueError(
            f"backend {backend!r}: the latent grid {grid} holds {math.prod(grid)} tokens but the "
            f"call has {num_image} image tokens ({seq_len} in all, {num_text} text); the adapter must "
            "pass the grid after patchify"
        )
    perm, inverse = _layout_permutation(num_text, grid, image_order, q.device)
    return SparseLayout(
        seq_len=seq_len,
        num_text=num_text,
        grid=grid,
        first_frame_blocks=math.ceil(grid[1] * grid[2] / block_size) if grid[0] > 1 else 0,
        block_size=block_size,
        perm=perm,
        inverse=inverse,
        key_lengths=None if context is None else context.key_lengths,
    )


@cached_in_eager
def reorders(image_order, grid: tuple[int, int, int]) -> bool:
    """Whether ``image_order`` moves the image tokens of ``grid``; asked once per grid in eager mode,
    as an order is built on the host."""
    return image_order is not None and image_order(grid) is not None


@cached_in_eager
def _layout_permutation(num_text: int, grid: tuple[int, int, int], image_order, device: torch.device):
    """(perm, inverse) gather indices on ``device``, or (None, None) when the order is unchanged."""
    image_perm = image_order(grid) if image_order is not None else None
    if image_perm is None:
        return None, None
    num_image = math.prod(grid)
    perm = torch.cat([image_perm, torch.arange(num_image, num_image + num_text)]) if num_text else image_perm
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm.to(device), inverse.to(device)
