"""attnbridge's Ascend kernels (``fa`` -> npu_fused_infer_attention_score, ``sdpa`` ->
npu_fusion_attention) give the right attention through the emulated torch_npu, pass the arguments
the ops document, and say what to install when torch_npu is missing.

Tolerances against the float64 reference (relative L2 of the output): bfloat16/float16 2e-2,
float32 1e-5; LSE absolute 1e-4 (float32, natural log).
"""

from __future__ import annotations

import inspect
import math
import sys

import pytest
import torch

from attnbridge.attention.api import attend
from attnbridge.errors import BackendUnavailableError
from tests.emulation import fake_torch_npu
from tests.emulation.reference import dense_reference, rel_l2

TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-5}
LSE_ATOL = 1e-4

# (B, S_q, S_kv, H_q, H_kv, D, causal, scale): odd lengths, GQA, cross-attention (S_q < S_kv and
# S_q > S_kv, where causal leaves the first rows seeing no key), explicit and default scale.
CASES = [
    (1, 37, 37, 4, 4, 64, False, None),
    (2, 19, 19, 8, 2, 32, True, None),
    (2, 13, 29, 4, 1, 64, False, 0.3),
    (1, 9, 23, 6, 3, 16, True, None),
    (2, 31, 17, 4, 2, 32, True, 0.2),
]
CASE_IDS = ["mha", "gqa-causal", "cross-mqa", "cross-causal", "cross-causal-sq>skv"]


def _qkv(b, s_q, s_kv, h, h_kv, d, dtype):
    return (
        torch.randn(b, s_q, h, d, dtype=dtype),
        torch.randn(b, s_kv, h_kv, d, dtype=dtype),
        torch.randn(b, s_kv, h_kv, d, dtype=dtype),
    )


def _bound(op, args, kwargs) -> dict:
    """The call's arguments by parameter name, whether passed by position or keyword."""
    bound = inspect.signature(op).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _assert_causal_plumbing(arguments: dict, causal: bool) -> None:
    if causal:
        assert arguments["sparse_mode"] == 3
        mask = arguments["atten_mask"]
        assert mask.shape == (2048, 2048) and mask.dtype == torch.bool
    else:
        assert arguments["sparse_mode"] == 0 and arguments["atten_mask"] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fa_on_npu_runs_fused_infer_attention_with_lse(fake_npu, case, dtype):
    b, s_q, s_kv, h, h_kv, d, causal, scale = case
    q, k, v = _qkv(b, s_q, s_kv, h, h_kv, d, dtype)
    if causal and s_q > s_kv:
        # Rows with no visible key: FIA does not define their output, so the call is refused up front.
        with pytest.raises(ValueError, match="more queries .* than keys .* FIA does not define"):
            attend(q, k, v, backend="fa", platform="npu", causal=True, return_lse=True)
        assert fake_npu.calls == []
        return
    out, lse = attend(q, k, v, backend="fa", platform="npu", causal=causal, scale=scale, return_lse=True)
    want_out, want_lse = dense_reference(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_l2(out, want_out) < TOL[dtype]
    assert lse.shape == (b, h, s_q) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse, atol=LSE_ATOL, rtol=0)

    assert [c[0] for c in fake_npu.calls] == ["npu_fused_infer_attention_score"]
    arguments = _bound(fake_torch_npu.npu_fused_infer_attention_score, *fake_npu.calls[0][1:])
    assert arguments["input_layout"] == "BSND"
    assert arguments["num_heads"] == h and arguments["num_key_value_heads"] == h_kv
    assert arguments["softmax_lse_flag"] is True
    assert arguments["scale"] == pytest.approx(1 / math.sqrt(d) if scale is None else scale)
    _assert_causal_plumbing(arguments, causal)


def test_fa_on_npu_without_lse_returns_the_output_only(fake_npu):
    q, k, v = _qkv(2, 10, 10, 4, 2, 32, torch.bfloat16)
    out = attend(q, k, v, backend="fa", platform="npu")
    assert isinstance(out, torch.Tensor)
    assert rel_l2(out, dense_reference(q, k, v)[0]) < TOL[torch.bfloat16]
    assert (
        _bound(fake_torch_npu.npu_fused_infer_attention_score, *fake_npu.calls[0][1:])["softmax_lse_flag"]
        is False
    )


def test_fa_on_npu_float32_is_handled_or_refused_by_name(fake_npu):
    """FIA documents float16/bfloat16 inputs only: float32 must either work (the impl converts) or be
    refused up front with an error naming the supported dtypes, never reach the op and fail there."""
    q, k, v = _qkv(1, 12, 12, 4, 4, 32, torch.float32)
    try:
        out, lse = attend(q, k, v, backend="fa", platform="npu", causal=True, return_lse=True)
    except ValueError as error:
        assert "bfloat16" in str(error) and "float32" in str(error)
        return
    want_out, want_lse = dense_reference(q, k, v, causal=True)
    assert out.dtype == torch.float32
    assert rel_l2(out, want_out) < TOL[torch.bfloat16]  # computed in a half dtype
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sdpa_on_npu_runs_fusion_attention(fake_npu, case, dtype):
    b, s_q, s_kv, h, h_kv, d, causal, scale = case
    q, k, v = _qkv(b, s_q, s_kv, h, h_kv, d, dtype)
    out = attend(q, k, v, backend="sdpa", platform="npu", causal=causal, scale=scale)
    want_out, _ = dense_reference(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_l2(out, want_out) < TOL[dtype]

    assert [c[0] for c in fake_npu.calls] == ["npu_fusion_attention"]
    arguments = _bound(fake_torch_npu.npu_fusion_attention, *fake_npu.calls[0][1:])
    assert arguments["input_layout"] == "BSND" and arguments["head_num"] == h
    assert arguments["keep_prob"] == 1.0
    assert arguments["scale"] == pytest.approx(1 / math.sqrt(d) if scale is None else scale)
    _assert_causal_plumbing(arguments, causal)


def test_sdpa_on_npu_refuses_lse_and_points_to_fa(fake_npu):
    q, k, v = _qkv(1, 8, 8, 2, 2, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="'fa'"):
        attend(q, k, v, backend="sdpa", platform="npu", return_lse=True)
    assert fake_npu.calls == []


@pytest.mark.parametrize("backend", ["fa", "sdpa"])
def test_npu_without_torch_npu_names_the_package(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail here, always
    q, k, v = _qkv(1, 8, 8, 2, 2, 16, torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="torch-npu") as caught:
        attend(q, k, v, backend=backend, platform="npu")
    assert caught.value.platform == "npu" and caught.value.backend == backend
