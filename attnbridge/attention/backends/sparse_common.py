"""What the sparse video backends (``block_sparse``, ``rain_fusion``) share: config checks, the
per-step metadata, the token layout the block mask is built over, and the dense fallback.

Rules every sparse backend here follows (documented once, so the backends agree):

* **Dense steps.** Steps ``step < skip_first_steps`` run the platform's dense ``fa`` kernel, so the
  output is exactly the dense output. ``skip_first_steps`` defaults to 0; a context without a step
  counts as past the dense steps.
* **Dense calls.** Cross-attention (``context.kind == "cross"`` or ``S_q != S_kv``), a bare call
  without a context (ring-attention hops make those) and an LSE request on Ascend run dense ``fa``.
* **Joint attention** (text first): the sequence is rearranged to ``[image tokens | text tokens]``,
  so image blocks stay aligned to 128-token boundaries and the text lands in the last blocks. Every
  block that holds a text token is a dense row (text queries see everything) and a dense column
  (every query sees all text). The output is put back in the caller's order.
* **First frame.** With a video grid (``T > 1``) the first latent frame's ``ceil(H*W/128)`` blocks
  are dense rows and dense columns. A single-frame grid (an image) has no first frame to protect:
  applying the rule there would make the whole image dense.
"""

from __future__ import annotations

import functools
import logging
import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbridge.attention.backends.block_select import BlockSelection
from attnbridge.attention.contract import (
    AttentionContext,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    default_scale,
)
from attnbridge.attention.registry import check_sparsity

logger = logging.getLogger("attnbridge")

#: Tokens per block of every block mask here (the Ascend kernels' ``sparse_size``).
BLOCK_SIZE = 128


def validate_sparse_config(backend: str, sparsity: object, skip_first_steps: object) -> tuple[float, int]:
    """Check the user's options; errors name the backend and the allowed range."""
    sparsity = check_sparsity(backend, sparsity)
    if isinstance(skip_first_steps, bool) or not isinstance(skip_first_steps, int) or skip_first_steps < 0:
        raise ValueError(
            f"backend {backend!r}: skip_first_steps must be an integer >= 0 (dense denoising steps "
            f"before sparsity starts); got {skip_first_steps!r}"
        )
    return sparsity, int(skip_first_steps)


@dataclass
class SparseStepMetadata(AttentionMetadata):
    """What one denoising step of a sparse backend needs: whether it is dense, and the token grid."""

    step: int | None
    sparsity: float
    skip_first_steps: int
    #: Latent token grid ``(T, H, W)`` (already divided by the patch size), or None if unknown.
    grid: tuple[int, int, int] | None
    block_size: int = BLOCK_SIZE

    @property
    def dense(self) -> bool:
        return self.step is not None and self.step < self.skip_first_steps

    @property
    def block_frame_stride(self) -> int:
        """Blocks covering the first latent frame (0 for images: see the module docstring)."""
        if self.grid is None or self.grid[0] <= 1:
            return 0
        return math.ceil(self.grid[1] * self.grid[2] / self.block_size)


class SparseMetadataBuilder(AttentionMetadataBuilder):
    """Validates the options and caches the metadata per (step, grid): every layer of a step shares it."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._cache: dict[tuple, SparseStepMetadata] = {}
        self._warned_dense = False

    def build(self, context: AttentionContext, **config) -> SparseStepMetadata:
        sparsity, skip = validate_sparse_config(
            self.backend, config.get("sparsity", 0.0), config.get("skip_first_steps", 0)
        )
        if sparsity == 0.0 and not self._warned_dense:
            self._warned_dense = True
            logger.warning(
                "attention backend %r with sparsity=0 keeps every block; a dense backend ('fa' or "
                "'sdpa') computes the same result faster",
                self.backend,
            )
        grid = tuple(int(n) for n in context.grid) if context.grid is not None else None
        key = (context.step, grid, sparsity, skip)
        metadata = self._cache.get(key)
        if metadata is None:
            metadata = SparseStepMetadata(
                step=context.step, sparsity=sparsity, skip_first_steps=skip, grid=grid
            )
            if len(self._cache) > 256:  # a long run with many grids: keep memory bounded
                self._cache.clear()
            self._cache[key] = metadata
        return metadata


@dataclass(frozen=True)
class SparseLayout:
    """How one self/joint call maps onto the block mask.

    ``perm`` (or None for "no reordering") gathers the caller's tokens into mask order
    ``[image tokens (in backend order) | text tokens]``; ``inverse`` puts them back.
    """

    seq_len: int
    num_text: int
    grid: tuple[int, int, int]
    first_frame_blocks: int
    block_size: int = BLOCK_SIZE
    perm: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.seq_len / self.block_size)

    @property
    def text_start_block(self) -> int:
        """First block holding a text token (``num_blocks`` when there is no text)."""
        if self.num_text == 0:
            return self.num_blocks
        return (self.seq_len - self.num_text) // self.block_size

    @property
    def num_dense_blocks(self) -> int:
        """How many blocks :meth:`dense_blocks` marks (first frame and text may overlap)."""
        return len(self.dense_rows)

    @property
    def dense_rows(self) -> tuple[int, ...]:
        """Query blocks that attend every key block (the long rows a kernel should split)."""
        first = min(self.first_frame_blocks, self.text_start_block)
        return tuple(range(first)) + tuple(range(self.text_start_block, self.num_blocks))

    def dense_blocks(self, device: torch.device) -> torch.Tensor:
        """Bool ``[num_blocks]``: blocks that are dense rows and dense columns (first frame, text)."""
        return dense_block_flags(self.num_blocks, self.first_frame_blocks, self.text_start_block, device)

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


_compiled_fns: dict = {}


def compiled_on_cuda(fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled once (``dynamic=False``) for CUDA tensors, as is elsewhere (CPU, Ascend).

    Block selection is a dozen small ops on ``[B, H, nb, nb]``; launched one by one they cost more
    than their work, compiled they are a few fused kernels.
    """
    if device.type != "cuda":
        return fn
    compiled = _compiled_fns.get(fn)
    if compiled is None:
        compiled = _compiled_fns[fn] = torch.compile(fn, dynamic=False)
    return compiled


def resolve_layout(
    backend: str,
    q: torch.Tensor,
    metadata: SparseStepMetadata,
    context: AttentionContext | None,
    image_order: Callable[[tuple[int, int, int]], torch.Tensor | None] | None = None,
) -> SparseLayout:
    """Check the grid against the sequence and build the mask-order layout for this call.

    ``image_order`` (a module-level function, so it can key a cache) maps the grid to the gather
    order of the image tokens, or None for raster order.
    """
    seq_len = q.shape[1]
    num_text = context.num_text_tokens if context is not None and context.kind == "joint" else 0
    num_image = seq_len - num_text
    if num_text < 0 or num_image <= 0:
        raise ValueError(
            f"backend {backend!r}: joint attention with {num_text} text tokens does not fit a sequence "
            f"of {seq_len} tokens"
        )
    grid = metadata.grid if metadata.grid is not None else (1, 1, num_image)
    if math.prod(grid) != num_image:
        raise ValueError(
            f"backend {backend!r}: the latent grid {tuple(grid)} holds {math.prod(grid)} tokens but the "
            f"call has {num_image} image tokens ({seq_len} in all, {num_text} text); the adapter must "
            "pass the grid after patchify"
        )
    frames, height, width = grid
    block = metadata.block_size
    perm, inverse = _layout_permutation(num_text, tuple(grid), image_order, str(q.device))
    return SparseLayout(
        seq_len=seq_len,
        num_text=num_text,
        grid=tuple(grid),
        first_frame_blocks=math.ceil(height * width / block) if frames > 1 else 0,
        block_size=block,
        perm=perm,
        inverse=inverse,
    )


@functools.lru_cache(maxsize=64)
def _layout_permutation(num_text: int, grid: tuple[int, int, int], image_order, device: str):
    """(perm, inverse) gather indices on ``device``, or (None, None) when the order is unchanged.

    Cached per grid and device, so a step's layers do not rebuild or re-upload them.
    """
    image_perm = image_order(grid) if image_order is not None else None
    if num_text == 0 and image_perm is None:
        return None, None
    num_image = math.prod(grid)
    image = torch.arange(num_image) if image_perm is None else image_perm
    perm = torch.cat([image + num_text, torch.arange(num_text)]) if num_text else image
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm.to(device), inverse.to(device)


def dense_fa_impl(device: torch.device, *, npu: bool = False) -> AttentionImpl:
    """The dense ``fa`` kernel of ``device``'s platform table, which sparse backends run on dense steps
    and for the calls they do not make sparse. With ``npu`` it is Ascend's whatever the tensors'
    device, since the Ascend impls also run on CPU tensors (the emulation). Cached per platform."""
    from attnbridge.platforms import platform_name_for_device

    return _platform_fa("npu" if npu else platform_name_for_device(device))


@functools.lru_cache(maxsize=8)
def _platform_fa(platform: str) -> AttentionImpl:
    from attnbridge.platforms import get_platform

    return get_platform(platform).resolve("fa", strict=True)(backend_name="fa")


def is_dense_call(q: torch.Tensor, k: torch.Tensor, metadata, context: AttentionContext | None) -> bool:
    """Calls no sparse backend here makes sparse: no context, cross-attention, dense steps."""
    if context is None and metadata is None:
        return True
    if context is not None and context.kind == "cross":
        return True
    if q.shape[1] != k.shape[1]:
        return True
    return metadata is not None and metadata.dense


class SparseImplBase(AttentionImpl):
    """The forward every block-mask backend here shares: dense when the rules say so, else
    reorder -> select blocks -> run the block-sparse kernel -> restore the caller's order.

    Subclasses provide :meth:`select` (which blocks) and :meth:`run_sparse` (which kernel).
    """

    supports_causal = False
    #: Runs on Ascend (dense fallback is NpuFIAImpl there).
    npu: ClassVar[bool] = False
    #: Whether :meth:`run_sparse` can return the LSE; if not, LSE requests run dense ``fa``.
    sparse_lse: ClassVar[bool] = True
    #: Module-level function grid -> image-token gather order (None: raster order).
    image_order: ClassVar[Callable | None] = None

    def __init__(self, backend_name: str = "", **config) -> None:
        super().__init__(backend_name, **config)
        validate_sparse_config(
            self.backend_name, config.get("sparsity", 0.0), config.get("skip_first_steps", 0)
        )
        self._builder = SparseMetadataBuilder(self.backend_name)

    def make_metadata_builder(self) -> SparseMetadataBuilder:
        return SparseMetadataBuilder(self.backend_name)

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        if metadata is None and context is not None:
            metadata = self._builder.build(context, **self.config)
        if is_dense_call(q, k, metadata, context) or (return_lse and not self.sparse_lse):
            return self.dense(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        scale = default_scale(q.shape[-1], scale)
        order = type(self).image_order
        layout = resolve_layout(self.backend_name, q, metadata, context, order)
        qs, ks, vs = (layout.to_mask_order(x) for x in (q, k, v))
        selection = self.select(qs, ks, scale, metadata.sparsity, layout)
        result = self.run_sparse(qs, ks, vs, selection, scale, return_lse, layout)
        if return_lse:
            out, lse = result
            return layout.from_mask_order(out), layout.from_mask_order(lse, seq_dim=2)
        return layout.from_mask_order(result)

    def dense(self, q, k, v, *, causal=False, scale=None, return_lse=False):
        """The platform's dense ``fa`` kernel: exactly what a dense step computes."""
        impl = dense_fa_impl(q.device, npu=self.npu)
        return impl.forward(q, k, v, causal=causal, scale=scale, return_lse=return_lse)

    @abstractmethod
    def select(self, q, k, scale: float, sparsity: float, layout: SparseLayout) -> BlockSelection:
        """Kept key blocks per query block (q, k already in mask order)."""

    @abstractmethod
    def run_sparse(
        self, q, k, v, selection: BlockSelection, scale: float, return_lse: bool, layout: SparseLayout
    ):
        """Attention over the kept blocks (BSHD in mask order) -> out, or (out, lse)."""
