"""A block-sparse backend on one platform = a selector (which blocks) composed with a kernel (how).
``block_sparse`` and ``rain_fusion`` differ in their selector, CPU/CUDA and Ascend in their kernel;
:func:`compose` makes the impl class of one pair, with the kernel's limits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from attnbridge.attention.contract import DENSE_DTYPES, default_scale
from attnbridge.attention.options import count, fraction, option
from attnbridge.attention.registry import DenseFallbackImpl
from attnbridge.attention.sparse.layout import is_dense_step, reorders, resolve_layout
from attnbridge.attention.sparse.selection import BlockSelection, dense_selection
from attnbridge.notices import warn_once


@dataclasses.dataclass(frozen=True)
class SparseOptions:
    """Options of the block-mask backends."""

    sparsity: float = option(0.75, "fraction of key blocks each query block skips, in [0, 1)", fraction)
    skip_first_steps: int = option(0, "denoising steps run dense before sparsity starts, integer >= 0", count)


@dataclasses.dataclass(frozen=True)
class Selector:
    """``select(q, k, scale, options, layout)`` on q, k in mask order -> the kept blocks;
    ``image_order(grid)``: the gather order of the image tokens (None: raster)."""

    name: str
    select: Callable[..., BlockSelection]
    image_order: Callable[[tuple[int, int, int]], torch.Tensor | None] | None = None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """How the kept blocks are computed: ``run(q, k, v, selection, scale, return_lse, layout,
    key_lengths)`` on BSHD tensors in mask order, and the limits of that kernel."""

    name: str
    run: Callable[..., Any]
    supported_dtypes: tuple[torch.dtype, ...] = DENSE_DTYPES
    supported_head_sizes: tuple[int, ...] | None = None
    #: Whether ``run`` returns the LSE; if not, LSE requests run dense ``fa``.
    returns_lse: bool = True
    #: Whether ``run`` honours key padding; if not, padded calls run dense ``fa``.
    key_padding: bool = True
    #: Whether ``run`` takes more query blocks than key blocks (rows past the selection's).
    query_tail: bool = False
    install: tuple[str, ...] = ()
    check_available: Callable[[str], None] = lambda platform: None
    notes: str = ""


def list_kernel(attention: Callable[..., Any]) -> Callable[..., Any]:
    """A :attr:`Kernel.run` calling ``attention`` (a ``block_sparse_attention``) on the selection's lists."""

    def run(q, k, v, selection, scale: float, return_lse: bool, layout, key_lengths=None):
        lists = {"block_size": layout.block_size, "key_lengths": key_lengths, "return_lse": return_lse}
        return attention(q, k, v, selection.indices, selection.counts, scale=scale, **lists)

    return run


class SparseImpl(DenseFallbackImpl):
    """Dense when the rules of :mod:`.layout` say so, else reorder -> select -> kernel -> restore."""

    selector: ClassVar[Selector]
    kernel: ClassVar[Kernel]
    supports_causal = False

    @classmethod
    def check_available(cls, platform: str) -> None:
        cls.kernel.check_available(platform)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.options.sparsity == 0.0:
            warn_once(
                f"attention backend {self.backend!r} with sparsity=0 keeps every block; a dense backend "
                "('fa' or 'sdpa') computes the same result faster"
            )

    def _reorders(self, context) -> bool:
        return reorders(self.selector.image_order, tuple(context.grid or (1, 1, 1)))

    def serves_text_tail(self, context) -> bool:
        """The text queries past the keys are dense rows after the selection's, which a list kernel takes;
        the keys' last block must then hold text (a dense row too) and keep the caller's order."""
        return self.kernel.query_tail and context.num_text_tokens > 0 and not self._reorders(context)

    def runs_dense(self, q, k, return_lse: bool, context) -> bool:
        """Calls no block mask applies to (see :mod:`.layout`), and those the kernel cannot answer."""
        if context is None or context.kind == "cross":
            return True
        if q.shape[1] != k.shape[1] and not (
            q.shape[1] > k.shape[1] and context.kind == "joint" and self.serves_text_tail(context)
        ):
            return True
        if is_dense_step(context, self.options.skip_first_steps):
            return True
        if return_lse and not self.kernel.returns_lse:
            return True
        if context.key_lengths is None:
            return False
        reorders = self._reorders(context)
        if reorders and self.kernel.key_padding:
            warn_once(
                f"backend {self.backend!r}: its token order on a grid of more than one frame would move "
                "the padded keys off the end, so calls with padded keys run dense 'fa'"
            )
        return not self.kernel.key_padding or reorders

    def _select(self, q, k, scale: float, context):
        """The call's layout (over the keys), q and k in mask order, and the blocks the selector keeps;
        query blocks past the key blocks (a joint call's text tail) keep every key block."""
        layout = resolve_layout(self.backend, k, context, self.selector.image_order)
        qs, ks = layout.to_mask_order(q), layout.to_mask_order(k)
        selection = self.selector.select(qs[:, : k.shape[1]], ks, scale, self.options, layout)
        return layout, qs, ks, _with_dense_rows(selection, math.ceil(q.shape[1] / layout.block_size))

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        if self.runs_dense(q, k, return_lse, context):
            return self.dense(q, k, v, causal=causal, scale=scale, return_lse=return_lse, context=context)
        scale = default_scale(q.shape[-1], scale)
        layout, qs, ks, selection = self._select(q, k, scale, context)
        vs = layout.to_mask_order(v)
        result = self.kernel.run(qs, ks, vs, selection, scale, return_lse, layout, context.key_lengths)
        if return_lse:
            out, lse = result
            return layout.from_mask_order(out), layout.from_mask_order(lse, seq_dim=2)
        return layout.from_mask_order(result)

    def kept_fraction(self, q, k, context) -> float | None:
        """Fraction of block pairs this call attends (None: dense), for ``attnbridge generate``."""
        if self.runs_dense(q, k, False, context):
            return None
        selection = self._select(q, k, default_scale(q.shape[-1], None), context)[3]
        pairs = selection.counts.numel() * selection.num_kv_blocks
        return float(selection.counts.sum()) / pairs


def _with_dense_rows(selection: BlockSelection, n_rows: int) -> BlockSelection:
    """``selection`` with query blocks added up to ``n_rows``, each keeping every key block."""
    extra = n_rows - selection.counts.shape[-1]
    if extra <= 0:
        return selection
    batch, heads = selection.counts.shape[:2]
    dense = dense_selection(batch, heads, extra, selection.num_kv_blocks, selection.counts.device)
    return BlockSelection(
        torch.cat([selection.indices, dense.indices], dim=2),
        torch.cat([selection.counts, dense.counts], dim=2),
        selection.num_kv_blocks,
    )


def compose(selector: Selector, kernel: Kernel) -> type[SparseImpl]:
    """The impl class of ``selector`` on ``kernel``, with the kernel's limits."""
    return type(
        f"{selector.name} + {kernel.name}",
        (SparseImpl,),
        {
            "__module__": __name__,
            "selector": selector,
            "kernel": kernel,
            "description": f"{selector.name} block selection + {kernel.name}",
            "supported_dtypes": kernel.supported_dtypes,
            "supported_head_sizes": kernel.supported_head_sizes,
            "install": kernel.install,
            "notes": kernel.notes,
            "padding_fallback": None if kernel.key_padding else f"{kernel.name} takes no key lengths",
        },
    )
