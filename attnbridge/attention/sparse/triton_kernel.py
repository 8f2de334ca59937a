"""Block-sparse flash-attention forward in Triton: each query block walks its own list of key blocks.

One program computes one query tile (``BLOCK_M`` rows of one batch and query head) against the key
blocks listed for its query block, with an online softmax in float32 (``exp2``, the scale folded
into log2 space) and tensor-core dots in the input dtype. The cost is proportional to the number of
listed blocks, with no mask evaluated per element except where keys can be invalid (the sequence
end, ``key_valid``, ``key_lengths``).

Work is issued longest list first: the (batch, head, query block) tiles are sorted by their counts
on the device each call, so the dense rows (first-frame and text rows of a video DiT) start first
and do not run alone at the end. On Hopper (sm_90+) Q/K/V tiles come through TMA tensor descriptors
built on the device; elsewhere, or for strides TMA cannot address, plain pointer loads are used.

The op is registered as ``attnbridge::block_sparse_attention`` (``torch.library.triton_op``), so
``torch.compile(fullgraph=True)`` traces it without a graph break; in eager mode the kernel is
launched directly, as the op's dispatch costs host time. Forward only (no autograd).

Importing this module never needs triton: :func:`available` says whether the kernel can run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing

import torch

from attnbridge.attention.sparse.impl import Kernel, list_kernel
from attnbridge.attention.sparse.selection import check_block_lists
from attnbridge.errors import BackendUnavailableError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the module imports, available() is False
    triton = None
    tl = None

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OP_NAME = "attnbridge::block_sparse_attention"
_ORDER_BLOCK = 32
_ORDER_CHUNK = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the kernel can run here: triton imports and a CUDA device is present (or triton's
    CPU interpreter is on, ``TRITON_INTERPRET=1``, which runs it on CPU tensors)."""
    if triton is None:
        return False
    return _interpreting() or torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch choices of the kernel; none of them changes the result beyond rounding.

    ``block_m``/``block_n``: query rows and keys per tile (None: the block size; a smaller power of
    two splits a block into sub-tiles). ``use_tma``: None picks TMA where the GPU (sm_90+) and the
    strides allow; True asks for it (still falls back when the strides do not allow it).
    ``ordered``: tiles run longest list first (one small ranking kernel per call). ``mask_branch``:
    mask the sequence end only in the key tile that crosses it (a branch per tile) rather than
    in every tile. One program per tile: a persistent grid, triton's warp specialization and a
    lazy rescale of the accumulator measured no faster on an H200 (docs/benchmarks.md).
    """

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool | None = None
    ordered: bool = True
    mask_branch: bool = True


#: Defaults on sm_90, keyed by (block_size, padded head dim), for bf16/fp16. Measured on an H200 at
#: the Wan 480p shape (S=32760, H=12, D=128, bf16; scripts/bench_block_sparse_kernel.py): 128-row
#: query tiles over 64-key sub-tiles with 4 warps (small enough for two programs per SM), TMA
#: loads, tiles issued longest list first, no persistent loop (a persistent grid measured no
#: faster), the sequence end masked only in the tile that crosses it. Dense: 12.8 ms against
#: cuDNN's 11.6 and Flex's 13.9; 10% kept with dense end rows: 1.6 ms against Flex's 2.2. The D=64
#: and D=256 entries follow the same shape with the shared memory they need, not measured.
SM90_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (128, 64): KernelConfig(block_n=64, num_warps=4, num_stages=3),
    (128, 128): KernelConfig(block_n=64, num_warps=4, num_stages=2),
    (128, 256): KernelConfig(block_n=64, num_warps=8, num_stages=2),
    (64, 64): KernelConfig(num_warps=4, num_stages=3),
    (64, 128): KernelConfig(num_warps=4, num_stages=3),
    (64, 256): KernelConfig(num_warps=4, num_stages=2),
}
#: Defaults on other GPUs (no TMA; shared memory as small as on sm_80).
GENERIC_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (128, 256): KernelConfig(block_n=64, num_warps=8, num_stages=1),
    (64, 256): KernelConfig(num_warps=4, num_stages=1),
}
_GENERIC_DEFAULT = KernelConfig(num_warps=8, num_stages=2)
_GENERIC_DEFAULT_64 = KernelConfig(num_warps=4, num_stages=2)
#: float32 tiles are twice as large: smaller key tiles and one stage fit any GPU.
_FP32_CONFIG = KernelConfig(block_n=64, num_warps=8, num_stages=1)
_FP32_CONFIG_64 = KernelConfig(num_warps=4, num_stages=1)
_FP32_CONFIG_D256 = KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)


def _padded_dim(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def default_config(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The launch choices used by :func:`block_sparse_attention` for this block size, head dim,
    dtype and device (measured on an H200 for sm_90)."""
    key = (block_size, _padded_dim(head_dim))
    if dtype == torch.float32:
        if key[1] > 128:
            return _FP32_CONFIG_D256
        return _FP32_CONFIG if block_size >= 128 else _FP32_CONFIG_64
    if device.type == "cuda" and _capability(_device_index(device))[0] >= 9 and key in SM90_CONFIGS:
        return SM90_CONFIGS[key]
    if key in GENERIC_CONFIGS:
        return GENERIC_CONFIGS[key]
    return _GENERIC_DEFAULT if block_size >= 128 else _GENERIC_DEFAULT_64


# --------------------------------------------------------------------------------------------------
# Argument checks (shapes and dtypes only: no device sync, traceable by dynamo)


def _fail(message: str):
    raise ValueError(f"block_sparse_attention: {message}")


def _check_args(q, k, v, kv_indices, kv_counts, block_size, scale, key_valid, key_lengths) -> None:
    tensors = {"q": q, "k": k, "v": v, "kv_indices": kv_indices, "kv_counts": kv_counts}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            _fail(f"{name} must be a tensor, got {type(value).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _fail(f"q, k, v must be 4-D BSHD; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        _fail(f"dtype {q.dtype} is not supported (bfloat16, float16, float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, _, h_q, dim = q.shape
    if k.shape != v.shape:
        _fail(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != dim:
        _fail(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (same batch and head dim)")
    h_kv = k.shape[2]
    if h_kv == 0 or h_q % h_kv != 0:
        _fail(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")
    if not 1 <= dim <= 256:
        _fail(f"head dim {dim} is not supported (1..256)")
    if block_size not in (64, 128):
        _fail(f"block_size must be 64 or 128, got {block_size}")
    if scale is not None and (not math.isfinite(scale) or scale == 0):
        _fail(f"scale must be a finite nonzero number, got {scale}")
    devices = {t.device for t in (q, k, v, kv_indices, kv_counts)}
    for name, value in (("key_valid", key_valid), ("key_lengths", key_lengths)):
        if value is not None:
            if not isinstance(value, torch.Tensor):
                _fail(f"{name} must be a tensor or None, got {type(value).__name__}")
            devices.add(value.device)
    if len(devices) != 1:
        _fail(f"all tensors must be on one device; got {sorted(str(d) for d in devices)}")
    if kv_indices.dtype not in (torch.int32, torch.int64) or kv_counts.dtype not in (
        torch.int32,
        torch.int64,
    ):
        _fail(f"kv_indices and kv_counts must be int32; got {kv_indices.dtype} and {kv_counts.dtype}")
    check_block_lists(q, k, kv_indices, kv_counts, block_size, key_valid)
    if key_lengths is not None and (
        key_lengths.dtype not in (torch.int32, torch.int64) or tuple(key_lengths.shape) != (batch,)
    ):
        _fail(
            f"key_lengths must be an int32 tensor of shape [{batch}] (B); "
            f"got {key_lengths.dtype} {tuple(key_lengths.shape)}"
        )


def _tma_friendly(x: torch.Tensor) -> bool:
    """TMA addresses rows of the last dim from a 16-byte-aligned base with 16-byte-multiple strides.

    Checked on strides and the storage offset only (storages are allocated aligned), so the check
    also runs on the fake tensors of a compiled graph."""
    size = x.element_size()
    if x.stride(-1) != 1 or (x.storage_offset() * size) % 16:
        return False
    return all((x.stride(d) * size) % 16 == 0 for d in range(x.dim() - 1))


def _strides(x: torch.Tensor, count: int) -> list[int]:
    return [int(x.stride(d)) for d in range(count)]


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a small global scratch buffer per program; triton takes
    it from the allocator set with ``triton.set_allocator``. Ours is installed only if none is."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream):
    device = "cpu" if _interpreting() or not torch.cuda.is_available() else "cuda"
    return torch.empty(size, dtype=torch.int8, device=device)


# --------------------------------------------------------------------------------------------------
# Kernel

if triton is not None:

    @triton.jit
    def _load_key_tile(
        base, keys, offs_d, stride, seq_kv, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, EVEN_KV: tl.constexpr
    ):
        """``[BLOCK_N, D_PAD]`` rows ``keys`` of a K or V head through pointers; past the sequence
        end and the head dim, zeros (no mask when neither can happen)."""
        offsets = keys[:, None] * stride + offs_d[None, :]
        if EVEN_KV and D_PAD == HEAD_DIM:
            tile = tl.load(base + offsets)
        else:
            tile = tl.load(
                base + offsets, mask=(keys < seq_kv)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0
            )
        return tile

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, Out, Lse, Indices, Counts, Order, KeyValid, KeyLengths,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
        stride_ib, stride_ih, stride_iq, stride_iw, stride_cb, stride_ch, stride_cq,
        seq_q, seq_kv, heads_q, n_q_blocks, width, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, ORDERED: tl.constexpr,
        EVEN_KV: tl.constexpr, MASK_KV: tl.constexpr, MASK_BRANCH: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_LENGTHS: tl.constexpr, STORE_LSE: tl.constexpr,
        NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One program per 128-row query tile (``ORDERED``: the tiles in issue order, longest list
        first) walking its own list of key blocks with an online softmax."""
        tile = tl.program_id(0)
        SUB_M: tl.constexpr = BLOCK // BLOCK_M
        qk_scale = tl.cast(qk_scale, tl.float32)  # a float argument is float64 when inductor launches
        SUB_N: tl.constexpr = BLOCK // BLOCK_N
        if SUB_M == 1:
            work = tile
            start_m = 0
        else:
            work = tile // SUB_M
            start_m = (tile % SUB_M) * BLOCK_M
        if ORDERED:
            work = tl.load(Order + work)
        q_block = work % n_q_blocks
        head = (work // n_q_blocks) % heads_q
        batch = work // (n_q_blocks * heads_q)
        kv_head = head // GROUP
        start_m += q_block * BLOCK

        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        index_row = Indices + batch.to(tl.int64) * stride_ib + head * stride_ih + q_block * stride_iq
        count = tl.load(Counts + batch * stride_cb + head * stride_ch + q_block * stride_cq)
        count = tl.minimum(count, width)
        limit = seq_kv
        if HAS_LENGTHS:
            limit = tl.minimum(limit, tl.load(KeyLengths + batch).to(tl.int32))

        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        rows = start_m + offs_m
        if USE_TMA:
            q_desc = tl.make_tensor_descriptor(
                q_base, shape=[seq_q, HEAD_DIM], strides=[stride_qs, 1], block_shape=[BLOCK_M, D_PAD]
            )
            k_desc = tl.make_tensor_descriptor(
                k_base, shape=[seq_kv, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, D_PAD]
            )
            v_desc = tl.make_tensor_descriptor(
                v_base, shape=[seq_kv, HEAD_DIM], strides=[stride_vs, 1], block_shape=[BLOCK_N, D_PAD]
            )
            q = q_desc.load([start_m, 0])
        else:
            q_mask = (rows < seq_q)[:, None]
            if D_PAD != HEAD_DIM:
                q_mask = q_mask & (offs_d < HEAD_DIM)[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        for j in tl.range(0, count * SUB_N, num_stages=NUM_STAGES):
            if SUB_N == 1:
                start_n = tl.load(index_row + j * stride_iw) * BLOCK
            else:
                block_idx = tl.load(index_row + (j // SUB_N) * stride_iw)
                start_n = block_idx * BLOCK + (j % SUB_N) * BLOCK_N
            keys = start_n + offs_n
            if USE_TMA:
                k = k_desc.load([start_n, 0])
            else:
                k = _load_key_tile(k_base, keys, offs_d, stride_ks, seq_kv, HEAD_DIM, D_PAD, EVEN_KV)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if HAS_VALID:
                keep = (keys < limit) & (tl.load(KeyValid + keys, mask=keys < seq_kv, other=0) != 0)
                qk = tl.where(keep[None, :], qk, float("-inf"))
            elif MASK_KV:
                if MASK_BRANCH:  # only the block that crosses the limit pays for the mask
                    if start_n + BLOCK_N > limit:
                        qk = tl.where((keys < limit)[None, :], qk, float("-inf"))
                else:
                    qk = tl.where((keys < limit)[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if MASK_KV:
                # A row with no valid key so far keeps m = -inf; subtract 0 (p = 0, not NaN).
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
            if USE_TMA:
                v = v_desc.load([start_n, 0])
            else:
                v = _load_key_tile(v_base, keys, offs_d, stride_vs, seq_kv, HEAD_DIM, D_PAD, EVEN_KV)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)

        # A row that attended no key has l = 0 and acc = 0: it writes 0 and LSE -inf. NaN inputs
        # make l NaN, which is kept.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        o_mask = (rows < seq_q)[:, None]
        if D_PAD != HEAD_DIM:
            o_mask = o_mask & (offs_d < HEAD_DIM)[None, :]
        tl.store(
            o_base + rows[:, None] * stride_os + offs_d[None, :], out.to(Out.dtype.element_ty), mask=o_mask
        )
        if STORE_LSE:
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
            lse_base = Lse + (batch * heads_q + head).to(tl.int64) * seq_q
            tl.store(lse_base + rows, lse, mask=rows < seq_q)

    @triton.jit
    def _order_key(Counts, work, stride_cb, stride_ch, stride_cq, heads_q, n_q_blocks, n_work, width):
        """Sort key of each (batch, head, query block): its count, ties broken by position (first
        first); past ``n_work`` a key below every real one."""
        q_block = work % n_q_blocks
        head = (work // n_q_blocks) % heads_q
        batch = work // (n_q_blocks * heads_q)
        inside = work < n_work
        count = tl.load(
            Counts + batch * stride_cb + head * stride_ch + q_block * stride_cq, mask=inside, other=0
        )
        count = tl.where(inside, tl.maximum(tl.minimum(count, width), 0), -1)
        return count.to(tl.int64) * n_work + (n_work - 1 - work)

    @triton.jit
    def _issue_order(
        Counts,
        Order,
        stride_cb,
        stride_ch,
        stride_cq,
        heads_q,
        n_q_blocks,
        n_work,
        width,
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        """``Order[r]`` = the (batch, head, query block) with the r-th longest list: each entry's
        rank is the number of keys above its own. One launch, no sort: the lists number a few
        thousand, so the all-pairs count is a few microseconds spread over the SMs."""
        mine = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key = _order_key(Counts, mine, stride_cb, stride_ch, stride_cq, heads_q, n_q_blocks, n_work, width)
        rank = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, n_work, CHUNK):
            others = start + tl.arange(0, CHUNK)
            other_key = _order_key(
                Counts, others, stride_cb, stride_ch, stride_cq, heads_q, n_q_blocks, n_work, width
            )
            rank += tl.sum((other_key[None, :] > key[:, None]).to(tl.int32), 1)
        tl.store(Order + rank, mine, mask=mine < n_work)


# --------------------------------------------------------------------------------------------------
# Launch


def issue_order(counts: torch.Tensor, width: int, *, wrap=None) -> torch.Tensor:
    """int32 ``[B * H * n_q_blocks]``: the (batch, head, query block) entries of ``counts``
    ``[B, H, n_q_blocks]`` (any strides) flattened, longest list first, ties in position order
    (counts read clamped to ``[0, width]``). One small kernel, no host sync."""
    batch, heads, n_q_blocks = (int(n) for n in counts.shape)
    n_work = batch * heads * n_q_blocks
    order = torch.empty(n_work, dtype=torch.int32, device=counts.device)
    if n_work:
        kernel = _issue_order if wrap is None else wrap(_issue_order)
        kernel[(triton.cdiv(n_work, _ORDER_BLOCK),)](
            counts, order, *_strides(counts, 3), heads, n_q_blocks, n_work, int(width),
            BLOCK=_ORDER_BLOCK, CHUNK=_ORDER_CHUNK, num_warps=4,
        )  # fmt: skip
    return order


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_size: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    return_lse: bool = False,
    config: KernelConfig | None = None,
    wrap=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on checked arguments with explicit launch choices (the benchmark sweeps them).

    Returns ``(out, lse)``; ``lse`` is an empty tensor unless ``return_lse``. ``wrap`` is
    ``torch.library.wrap_triton`` when called from the registered op. No host sync."""
    if triton is None:
        raise RuntimeError("block_sparse_attention: triton is not installed")
    # Sizes and strides are specialized (guards under dynamic shapes): inductor cannot yet
    # decompose a user kernel whose scalar arguments are symbolic expressions.
    batch, s_q, h_q, dim = (int(n) for n in q.shape)
    s_kv, h_kv = int(k.shape[1]), int(k.shape[2])
    block_size, scale = int(block_size), float(scale)
    group = h_q // h_kv
    if config is None:
        config = default_config(block_size, dim, q.dtype, q.device)
    block_m = config.block_m or block_size
    block_n = config.block_n or block_size
    if block_size % block_m or block_size % block_n:
        _fail(f"block_m {block_m} and block_n {block_n} must divide block_size {block_size}")
    if scale < 0:  # the kernel masks with -inf before scaling: keep the scale positive
        q, scale = -q, -scale
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    kv_indices = kv_indices.to(torch.int32)
    kv_counts = kv_counts.to(torch.int32)
    n_q_blocks = -(-s_q // block_size)
    width = int(kv_indices.shape[3])
    indices = kv_indices.expand(batch, h_q, n_q_blocks, width)
    counts = kv_counts.expand(batch, h_q, n_q_blocks)

    out = torch.empty(batch, s_q, h_q, dim, dtype=q.dtype, device=q.device)
    lse_shape = (batch, h_q, s_q) if return_lse else (0,)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    n_tiles = batch * h_q * n_q_blocks * (block_size // block_m)
    if n_tiles == 0 or width == 0:  # nothing to compute, or no key listed anywhere
        return out.zero_(), lse.fill_(float("-inf"))

    use_tma = config.use_tma
    if use_tma is None:
        use_tma = q.device.type == "cuda" and _capability(_device_index(q.device))[0] >= 9
    use_tma = bool(use_tma) and all(_tma_friendly(x) for x in (q, k, v))
    if use_tma:
        _ensure_allocator()

    order = issue_order(counts, width, wrap=wrap) if config.ordered else counts
    has_valid, has_lengths = key_valid is not None, key_lengths is not None
    valid = key_valid if has_valid else counts
    lengths = key_lengths if has_lengths else counts
    even_kv = bool(s_kv % block_size == 0)

    kernel = _block_sparse_fwd if wrap is None else wrap(_block_sparse_fwd)
    kernel[(n_tiles,)](
        q, k, v, out, lse, indices, counts, order, valid, lengths,
        *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_strides(out, 3),
        *_strides(indices, 4), *_strides(counts, 3),
        s_q, s_kv, h_q, n_q_blocks, width, scale * _LOG2E,
        GROUP=group,
        HEAD_DIM=dim,
        D_PAD=_padded_dim(dim),
        BLOCK=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        USE_TMA=use_tma,
        ORDERED=config.ordered,
        EVEN_KV=even_kv,
        MASK_KV=not even_kv or has_valid or has_lengths,
        MASK_BRANCH=config.mask_branch,
        HAS_VALID=has_valid,
        HAS_LENGTHS=has_lengths,
        STORE_LSE=return_lse,
        NUM_STAGES=config.num_stages,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    return out, lse


# --------------------------------------------------------------------------------------------------
# Registered op (torch.compile traces it as one node)


def _op_body(q, k, v, kv_indices, kv_counts, block_size, scale, key_valid, key_lengths, return_lse):
    args = (q, k, v, kv_indices, kv_counts, block_size, scale, key_valid, key_lengths, return_lse)
    return launch(*args, wrap=torch.library.wrap_triton)


# The op's schema is inferred from these; given as objects, not the strings this module's
# ``from __future__ import annotations`` leaves, so every torch version reads them.
_op_body.__annotations__ = {
    **dict.fromkeys(("q", "k", "v", "kv_indices", "kv_counts"), torch.Tensor),
    **dict.fromkeys(("key_valid", "key_lengths"), typing.Optional[torch.Tensor]),  # noqa: UP045
    "block_size": int,
    "scale": float,
    "return_lse": bool,
    "return": typing.Tuple[torch.Tensor, torch.Tensor],  # noqa: UP006
}


def _register_op():
    """The custom op; None where triton or ``torch.library.triton_op`` (torch >= 2.6) is missing."""
    if triton is None or not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        return None
    namespace, name = _OP_NAME.split("::")
    if hasattr(getattr(torch.ops, namespace), name):  # this module imported twice (reload)
        return getattr(getattr(torch.ops, namespace), name).default
    return torch.library.triton_op(_OP_NAME, _op_body, mutates_args=())


_OP = _register_op()


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each ``block_size`` query block over its listed key blocks only.

    ``q`` ``[B, S_q, H_q, D]``, ``k``/``v`` ``[B, S_kv, H_kv, D]`` (BSHD, any strides with a
    contiguous last dim; ``H_q % H_kv == 0``, query head h reads key/value head
    ``h // (H_q // H_kv)``). ``kv_indices`` int32 ``[B or 1, H_q or 1, ceil(S_q / block_size), width]``:
    query block i attends the key blocks in its first ``kv_counts[..., i]`` entries (distinct, any
    order; the rest is ignored); ``kv_counts`` int32 ``[B or 1, H_q or 1, ceil(S_q / block_size)]``.
    ``key_valid`` bool ``[S_kv]``: False keys get no weight; ``key_lengths`` int32 ``[B]``: keys at
    or past ``key_lengths[b]`` get no weight in batch b. ``scale`` defaults to ``1/sqrt(D)``.

    Returns ``out`` ``[B, S_q, H_q, D]`` (contiguous, q's dtype) and, with ``return_lse``, the
    float32 natural-log LSE ``[B, H_q, S_q]``. A row that attends no valid key gets 0 and LSE -inf.
    """
    _check_args(q, k, v, kv_indices, kv_counts, block_size, scale, key_valid, key_lengths)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = (q, k, v, kv_indices, kv_counts, block_size, scale, key_valid, key_lengths, return_lse)
    if q.device.type == "cuda" and _OP is not None and torch.compiler.is_compiling():
        out, lse = _OP(*args)  # one graph node; in eager the op's dispatch would only add host time
    else:
        if not available():
            raise RuntimeError(
                "block_sparse_attention: needs triton and a CUDA device (or TRITON_INTERPRET=1)"
            )
        if q.device.type != "cuda" and not _interpreting():
            _fail(f"tensors must be on a CUDA device, got {q.device}")
        out, lse = launch(*args)
    return (out, lse) if return_lse else out


TRITON_INSTALL = "pip install triton"


def check_triton(platform: str) -> None:
    if not available():
        raise BackendUnavailableError(
            "block-sparse kernel",
            platform,
            "triton cannot be imported or no CUDA device is present",
            TRITON_INSTALL,
        )


TRITON = Kernel(
    "attnbridge Triton block-sparse kernel (longest rows first; TMA on Hopper)",
    list_kernel(block_sparse_attention),
    install=(TRITON_INSTALL,),
    check_available=check_triton,
    query_tail=True,
)
