"""The Triton block-sparse kernel against a float64 reference (dense softmax attention masked to the
listed blocks), on CUDA, and on CPU through triton's interpreter when asked.

* CUDA (needs triton and a GPU): several shapes incl. S not a multiple of the block, the Wan-like
  shape (B=1, H=12, D=128, S=4000), every launch variant, and ``torch.compile(fullgraph=True)``.
  Tolerances: bf16 rel-L2 < 1e-2 against float64, LSE within 2e-2 (absolute).
* Interpreter: ``ATTNBRIDGE_TRITON_INTERPRET=1 python -m pytest tests/test_triton_block_sparse.py``
  runs the same checks on small shapes in a subprocess with ``TRITON_INTERPRET=1`` (slow, CPU).
* Always: the argument checks, which run before any kernel.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnbridge.attention.sparse import triton_kernel as tk

REPO_ROOT = Path(__file__).resolve().parents[1]
BF16_REL_L2 = 1e-2
LSE_ATOL = 2e-2


def reference(q, k, v, kv_indices, kv_counts, block_size, scale=None, key_valid=None, key_lengths=None):
    """float64 ``(out BSHD, lse [B, H, S_q])``; rows with no valid key give out 0 and LSE -inf."""
    batch, s_q, h_q, dim = q.shape
    s_kv, h_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    n_q, n_k = -(-s_q // block_size), -(-s_kv // block_size)
    width = kv_indices.shape[-1]
    indices = kv_indices.expand(batch, h_q, n_q, width).long()
    listed = torch.arange(width, device=q.device) < kv_counts.expand(batch, h_q, n_q)[..., None].long()
    table = torch.zeros(batch, h_q, n_q, n_k + 1, dtype=torch.bool, device=q.device)
    table.scatter_(-1, torch.where(listed, indices, n_k), True)
    mask = table[..., :n_k].repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
    mask = mask[:, :, :s_q, :s_kv]
    if key_valid is not None:
        mask = mask & key_valid
    if key_lengths is not None:
        positions = torch.arange(s_kv, device=q.device)
        mask = mask & (positions < key_lengths[:, None])[:, None, None, :]
    group = h_q // h_kv
    qd = q.double().transpose(1, 2)
    kd = k.double().transpose(1, 2).repeat_interleave(group, 1)
    vd = v.double().transpose(1, 2).repeat_interleave(group, 1)
    scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(mask, torch.exp(scores - lse[..., None]), 0.0)
    return (probs @ vd).transpose(1, 2), lse


def random_lists(batch, heads, n_q, n_k, *, keep, generator, device="cpu"):
    """Index lists in random order with garbage past each count; the first query block attends
    nothing and the last attends everything."""
    kept = torch.rand(batch, heads, n_q, n_k, generator=generator) < keep
    kept[:, :, 0] = False
    kept[:, :, -1] = True
    counts = kept.sum(-1).to(torch.int32)
    order = torch.argsort(torch.rand(kept.shape, generator=generator) + (~kept) * 2.0, dim=-1).to(torch.int32)
    garbage = torch.randint(-7, 10_000, order.shape, generator=generator, dtype=torch.int32)
    indices = torch.where(torch.arange(n_k) < counts[..., None], order, garbage)
    return indices.to(device), counts.to(device)


def make_case(
    *,
    batch,
    s_q,
    s_kv,
    h_q,
    h_kv,
    dim,
    block_size,
    dtype,
    device,
    keep=0.5,
    broadcast=(False, False),
    key_valid=False,
    key_lengths=False,
    bhsd=False,
    seed=0,
):
    """Random q/k/v (BSHD; ``bhsd``: transposed views of BHSD tensors) with index lists."""
    gen = torch.Generator().manual_seed(seed)

    def tensor(s, h):
        if bhsd:
            return torch.randn(batch, h, s, dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, s, h, dim, generator=gen).to(device=device, dtype=dtype)

    q, k, v = tensor(s_q, h_q), tensor(s_kv, h_kv), tensor(s_kv, h_kv)
    n_q, n_k = -(-s_q // block_size), -(-s_kv // block_size)
    lists_b = 1 if broadcast[0] else batch
    lists_h = 1 if broadcast[1] else h_q
    indices, counts = random_lists(lists_b, lists_h, n_q, n_k, keep=keep, generator=gen, device=device)
    extra = {"block_size": block_size}
    if key_valid:
        extra["key_valid"] = (torch.rand(s_kv, generator=gen) > 0.2).to(device)
    if key_lengths:
        extra["key_lengths"] = torch.randint(1, s_kv + 1, (batch,), generator=gen, dtype=torch.int32).to(
            device
        )
    return (q, k, v, indices, counts), extra


def check(out, lse, ref_out, ref_lse, tol):
    """rel-L2 of ``out`` within ``tol``, LSE within LSE_ATOL where finite; empty rows exactly 0/-inf."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    rel = ((out.double() - ref_out).norm() / ref_out.norm()).item()
    assert rel < tol, f"rel-L2 {rel:.3e} >= {tol}"
    finite = torch.isfinite(ref_lse)
    assert finite.any() and (~finite).any()  # the cases hold attended and empty rows
    lse_err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
    assert lse_err < LSE_ATOL, f"LSE error {lse_err:.3e}"
    assert torch.all(lse[~finite] == float("-inf"))
    assert torch.all(out.transpose(1, 2)[~finite] == 0)
    return rel


def check_nan_propagates(run, device):
    """A NaN in an attended key reaches exactly the rows whose lists hold its block."""
    (q, k, v, indices, counts), extra = make_case(
        batch=1, s_q=200, s_kv=200, h_q=2, h_kv=1, dim=64, block_size=64, dtype=torch.float16, device=device
    )
    v = v.clone()
    v[0, 70, 0, 3] = float("nan")  # key block 1
    out, _ = run(q, k, v, indices, counts, extra)
    listed = (indices.long() == 1) & (torch.arange(indices.shape[-1], device=device) < counts[..., None])
    hit = listed.any(-1)[0]  # [H, n_q]
    rows_nan = out[0].isnan().any(-1).transpose(0, 1)  # [H, S_q]
    expected = hit.repeat_interleave(64, 1)[:, :200]
    assert torch.equal(rows_nan, expected)


def check_issue_order(device):
    """Longest list first, ties in position order, broadcast and out-of-range counts included."""
    gen = torch.Generator().manual_seed(0)
    for batch, heads, n_q, shape in [(2, 3, 7, (2, 3, 7)), (2, 4, 50, (1, 4, 50)), (1, 12, 300, (1, 1, 300))]:
        counts = torch.randint(-2, 12, shape, generator=gen, dtype=torch.int32).to(device)
        counts = counts.expand(batch, heads, n_q)
        expected = torch.argsort(counts.reshape(-1).clamp(0, 9), descending=True, stable=True)
        assert torch.equal(tk.issue_order(counts, 9).long(), expected)


# --------------------------------------------------------------------------------------------------
# Argument checks: no kernel needed


def _small_args(**overrides):
    args = {
        "q": torch.zeros(1, 100, 4, 64, dtype=torch.bfloat16),
        "k": torch.zeros(1, 120, 2, 64, dtype=torch.bfloat16),
        "v": torch.zeros(1, 120, 2, 64, dtype=torch.bfloat16),
        "kv_indices": torch.zeros(1, 4, 2, 2, dtype=torch.int32),
        "kv_counts": torch.zeros(1, 4, 2, dtype=torch.int32),
        "block_size": 64,
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_size": 32}, "block_size must be 64 or 128"),
        ({"q": torch.zeros(1, 100, 4, 64, dtype=torch.float64)}, "dtype torch.float64 is not supported"),
        (
            {
                "k": torch.zeros(1, 120, 3, 64, dtype=torch.bfloat16),
                "v": torch.zeros(1, 120, 3, 64, dtype=torch.bfloat16),
            },
            "multiple of key/value heads",
        ),
        ({"v": torch.zeros(1, 120, 2, 32, dtype=torch.bfloat16)}, "same shape"),
        ({"kv_indices": torch.zeros(1, 4, 3, 2, dtype=torch.int32)}, "kv_indices must be"),
        ({"kv_counts": torch.zeros(1, 4, 2, dtype=torch.float32)}, "must be int32"),
        ({"key_valid": torch.ones(100, dtype=torch.bool)}, "key_valid must be a bool tensor of shape [120]"),
        ({"key_lengths": torch.ones(2, dtype=torch.int32)}, "key_lengths must be an int32 tensor"),
        ({"scale": 0.0}, "scale must be a finite nonzero number"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(overrides, message):
    with pytest.raises(ValueError, match="block_sparse_attention: .*" + message.replace("[", r"\[")) as info:
        tk.block_sparse_attention(**_small_args(**overrides))
    assert "\n" not in str(info.value)


def test_available_is_false_without_triton():
    if importlib.util.find_spec("triton") is None:
        assert tk.available() is False


# --------------------------------------------------------------------------------------------------
# CUDA

cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and tk.triton is not None and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton and a CUDA device",
)

CUDA_CASES = {
    "gqa_b2_s1000_bs64_pads": dict(
        batch=2, s_q=1000, s_kv=1000, h_q=4, h_kv=2, dim=64, block_size=64, key_valid=True, key_lengths=True
    ),
    "bhsd_views_sq333_skv517_bs128_d128": dict(
        batch=1, s_q=333, s_kv=517, h_q=4, h_kv=4, dim=128, block_size=128, bhsd=True, broadcast=(True, False)
    ),
    "wan_like_s4000_h12_d128": dict(
        batch=1,
        s_q=4000,
        s_kv=4000,
        h_q=12,
        h_kv=12,
        dim=128,
        block_size=128,
        keep=0.25,
        broadcast=(True, False),
    ),
}


def _run_public(q, k, v, indices, counts, extra):
    return tk.block_sparse_attention(q, k, v, indices, counts, return_lse=True, **extra)


@cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda_matches_float64_reference(name):
    args, extra = make_case(**CUDA_CASES[name], dtype=torch.bfloat16, device="cuda")
    out, lse = _run_public(*args, extra)
    assert out.is_contiguous() and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    check(out, lse, *reference(*args, **extra), BF16_REL_L2)


LAUNCH_VARIANTS = [
    tk.KernelConfig(use_tma=False),
    tk.KernelConfig(use_tma=True, block_n=64, num_stages=2),
    tk.KernelConfig(use_tma=True, ordered=False, block_m=64, block_n=64, num_warps=4),
    tk.KernelConfig(use_tma=False, block_n=64, num_warps=4, num_stages=2, mask_branch=False),
]


@cuda
@pytest.mark.parametrize("config", LAUNCH_VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_launch_variants(config, dtype):
    args, extra = make_case(
        batch=2, s_q=300, s_kv=300, h_q=4, h_kv=2, dim=128, block_size=128, dtype=dtype, device="cuda",
        key_lengths=True,
    )  # fmt: skip
    out, lse = tk.launch(*args, scale=0.1, return_lse=True, config=config, **extra)
    check(out, lse, *reference(*args, scale=0.1, **extra), BF16_REL_L2)


@cuda
@pytest.mark.parametrize("dim", [32, 96, 256])
def test_cuda_other_head_dims(dim):
    args, extra = make_case(
        batch=1, s_q=200, s_kv=260, h_q=2, h_kv=1, dim=dim, block_size=64, dtype=torch.float16, device="cuda"
    )
    out, lse = _run_public(*args, extra)
    check(out, lse, *reference(*args, **extra), BF16_REL_L2)


@cuda
@pytest.mark.parametrize(("dim", "block_size"), [(64, 128), (128, 64), (256, 128)])
def test_cuda_float32(dim, block_size):
    args, extra = make_case(
        batch=1, s_q=300, s_kv=300, h_q=2, h_kv=1, dim=dim, block_size=block_size, dtype=torch.float32,
        device="cuda", key_lengths=True,
    )  # fmt: skip
    out, lse = _run_public(*args, extra)
    check(out, lse, *reference(*args, **extra), 1e-5)


@cuda
def test_cuda_issue_order():
    check_issue_order("cuda")


@cuda
def test_cuda_nan_propagates():
    check_nan_propagates(_run_public, "cuda")


@cuda
def test_cuda_fullgraph_compile():
    args, extra = make_case(
        batch=1, s_q=700, s_kv=700, h_q=4, h_kv=2, dim=128, block_size=128, dtype=torch.bfloat16,
        device="cuda", key_valid=True,
    )  # fmt: skip

    def layer(q, k, v, indices, counts, key_valid):
        out, lse = tk.block_sparse_attention(
            q * 1.0, k, v, indices, counts, block_size=128, key_valid=key_valid, return_lse=True
        )
        return out.float() * 2.0, lse

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out, lse = compiled(*args, extra["key_valid"])
    ref_out, ref_lse = reference(*args, **extra)
    check(out / 2.0, lse, ref_out, ref_lse, BF16_REL_L2)
    # a second call with new lists (same shapes) reuses the graph
    args2, _ = make_case(
        batch=1, s_q=700, s_kv=700, h_q=4, h_kv=2, dim=128, block_size=128, dtype=torch.bfloat16,
        device="cuda", seed=1,
    )  # fmt: skip
    out2, lse2 = compiled(*args2, extra["key_valid"])
    check(out2 / 2.0, lse2, *reference(*args2, **extra), BF16_REL_L2)


@cuda
def test_cuda_compile_with_dynamic_shapes():
    """Sizes, strides and the block size may reach the op as symbols (``dynamic=True``, or after a
    recompile); the launch specializes them."""

    def layer(q, k, v, indices, counts, block_size):
        return tk.block_sparse_attention(q, k, v, indices, counts, block_size=block_size, return_lse=True)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for seq, block_size in ((300, 64), (450, 64), (450, 128)):
        args, extra = make_case(
            batch=1, s_q=seq, s_kv=seq, h_q=4, h_kv=2, dim=64, block_size=block_size, dtype=torch.bfloat16,
            device="cuda",
        )  # fmt: skip
        check(*compiled(*args, block_size), *reference(*args, **extra), BF16_REL_L2)


# --------------------------------------------------------------------------------------------------
# Triton interpreter (CPU), in a subprocess so TRITON_INTERPRET stays out of this process


@pytest.mark.skipif(
    os.environ.get("ATTNBRIDGE_TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
    reason="set ATTNBRIDGE_TRITON_INTERPRET=1 (needs triton) to run the kernel in triton's interpreter",
)
def test_interpreter_matches_float64_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpret"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "interpreter cases passed" in result.stdout


def _patch_interpreter() -> None:
    """Two gaps of triton 3.6's interpreter that the compiled kernel does not have: its ``dot``
    multiplies bfloat16 operands as their raw uint16 bits, and a loaded scalar (a 1-element array
    there) cannot bound a loop under numpy >= 2.3. Both are patched for this process only."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def as_float32(handle):
        if handle.dtype == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, *args):
        return dot(self, as_float32(a), as_float32(b), d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        int(np.zeros(1))
    except TypeError:
        patch_tensor = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patched


def _interpreter_cases() -> None:
    """Every feature on small shapes, through both load paths and the tile schedules."""
    assert tk.available()
    _patch_interpreter()
    tol = {torch.bfloat16: BF16_REL_L2, torch.float16: 2e-3, torch.float32: 1e-5}
    config_sets = {
        "pointer": [
            tk.KernelConfig(use_tma=False),
            tk.KernelConfig(use_tma=False, block_n=64),
            tk.KernelConfig(use_tma=False, block_m=64, block_n=64, ordered=False),
            tk.KernelConfig(use_tma=False, mask_branch=False),
        ],
        "tma": [
            tk.KernelConfig(use_tma=True),
            tk.KernelConfig(use_tma=True, block_n=64),
            tk.KernelConfig(use_tma=True, block_m=64, block_n=64, ordered=False),
        ],
    }
    cases = [
        dict(batch=2, s_q=333, s_kv=333, h_q=4, h_kv=2, dim=64, block_size=128, dtype=torch.bfloat16,
             key_valid=True, key_lengths=True),
        dict(batch=1, s_q=1000, s_kv=1000, h_q=2, h_kv=2, dim=64, block_size=64, dtype=torch.float16,
             broadcast=(True, True), keep=0.3),
        dict(batch=2, s_q=200, s_kv=333, h_q=4, h_kv=2, dim=32, block_size=64, dtype=torch.float32,
             broadcast=(True, False), key_lengths=True, bhsd=True),
        dict(batch=1, s_q=256, s_kv=200, h_q=2, h_kv=1, dim=128, block_size=128, dtype=torch.bfloat16),
        dict(batch=1, s_q=200, s_kv=200, h_q=2, h_kv=1, dim=96, block_size=64, dtype=torch.bfloat16,
             key_valid=True, broadcast=(False, True)),
        dict(batch=1, s_q=256, s_kv=256, h_q=2, h_kv=2, dim=64, block_size=128, dtype=torch.bfloat16),
    ]  # fmt: skip
    for path, configs in config_sets.items():
        for number, case in enumerate(cases):
            args, extra = make_case(**case, device="cpu", seed=number)
            ref = reference(*args, scale=0.2, **extra)
            for config in configs if number == 0 else configs[:1]:
                out, lse = tk.launch(*args, scale=0.2, return_lse=True, config=config, **extra)
                rel = check(out, lse, *ref, tol[case["dtype"]])
                print(f"{path} case {number} {config}: rel-L2 {rel:.2e}", flush=True)

    # public entry: default scale, no LSE requested, negative scale
    args, extra = make_case(
        batch=1, s_q=150, s_kv=150, h_q=2, h_kv=1, dim=64, block_size=64, dtype=torch.float32, device="cpu"
    )
    out = tk.block_sparse_attention(*args, **extra)
    assert torch.allclose(out.double(), reference(*args, **extra)[0], atol=1e-5)
    out, lse = tk.block_sparse_attention(*args, scale=-0.3, return_lse=True, **extra)
    check(out, lse, *reference(*args, scale=-0.3, **extra), 1e-5)
    # no key listed anywhere
    q, k, v, indices, counts = args
    out, lse = tk.block_sparse_attention(q, k, v, indices[..., :0], counts * 0, return_lse=True, **extra)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    check_nan_propagates(_run_public, "cpu")
    check_issue_order("cpu")
    print("interpreter cases passed", flush=True)


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpreter_cases()
