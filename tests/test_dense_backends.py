"""Every dense backend equals a float64 reference on random shapes, with and without LSE."""

from __future__ import annotations

import pytest
import torch

from attnbridge import AttentionContext, attend
from attnbridge.errors import BackendUnavailableError
from tests.emulation.reference import dense_reference, rel_l2

# Relative L2 error bounds vs the float64 reference: fp32 kernels are exact up to rounding; bf16
# inputs carry ~3 significant digits, so their outputs land between 1e-3 and 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}

SHAPES = [
    # (batch, s_q, s_kv, heads_q, heads_kv, head_dim)
    (1, 33, 33, 4, 4, 64),  # odd self-attention length
    (2, 17, 45, 6, 2, 32),  # cross-attention with GQA
    (2, 128, 128, 8, 1, 128),  # MQA
    (1, 1, 257, 2, 2, 16),  # single query (decode-like)
]


def _qkv(shape, dtype):
    b, s_q, s_kv, h_q, h_kv, d = shape
    return (
        torch.randn(b, s_q, h_q, d, dtype=dtype),
        torch.randn(b, s_kv, h_kv, d, dtype=dtype),
        torch.randn(b, s_kv, h_kv, d, dtype=dtype),
    )


@pytest.mark.parametrize("backend", ["sdpa", "fa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dense_backend_matches_reference(backend, dtype, shape, causal):
    q, k, v = _qkv(shape, dtype)
    ref_out, _ = dense_reference(q, k, v, causal=causal)
    out = attend(q, k, v, backend=backend, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_l2(out, ref_out) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_fa_returns_lse(dtype, shape, causal):
    q, k, v = _qkv(shape, dtype)
    ref_out, ref_lse = dense_reference(q, k, v, causal=causal)
    out, lse = attend(q, k, v, backend="fa", causal=causal, return_lse=True)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert rel_l2(out, ref_out) < TOLERANCE[dtype]
    # LSE is computed in float32 from the (rounded) inputs, so it is tight even for bf16.
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


def test_custom_scale_is_used():
    q, k, v = _qkv((1, 20, 20, 2, 2, 8), torch.float32)
    ref_out, _ = dense_reference(q, k, v, scale=0.05)
    for backend in ("sdpa", "fa"):
        assert rel_l2(attend(q, k, v, backend=backend, scale=0.05), ref_out) < 1e-5


def test_sage_falls_back_to_fa_with_warning_once_on_cpu(caplog, monkeypatch):
    from attnbridge import AttentionLayer, notices

    monkeypatch.setattr(notices, "_given", set())
    q, k, v = _qkv((1, 9, 9, 2, 2, 64), torch.float32)
    with caplog.at_level("WARNING", logger="attnbridge"):
        out = attend(q, k, v, backend="sage")
        AttentionLayer("sage")(q, k, v)  # a second layer: no second warning
    assert caplog.text.count("using 'fa' instead") == 1
    assert rel_l2(out, dense_reference(q, k, v)[0]) < 1e-5


def test_sage_strict_raises_naming_the_cause():
    q, k, v = _qkv((1, 9, 9, 2, 2, 64), torch.float32)
    with pytest.raises(BackendUnavailableError, match="sage.*CUDA or MUSA"):
        attend(q, k, v, backend="sage", strict=True)


def test_unknown_backend_lists_known_ones():
    q, k, v = _qkv((1, 4, 4, 1, 1, 8), torch.float32)
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'.*sdpa, fa, sage"):
        attend(q, k, v, backend="flash3")


def test_sdpa_refuses_lse_and_names_fa():
    q, k, v = _qkv((1, 4, 4, 1, 1, 8), torch.float32)
    with pytest.raises(ValueError, match="'sdpa'.*cannot return the softmax LSE; use backend 'fa'"):
        attend(q, k, v, backend="sdpa", return_lse=True)


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "match"),
    [
        ((1, 4, 2, 8), (1, 4, 2, 16), "head_dim of q \\(8\\) and k \\(16\\) differ"),
        ((1, 4, 3, 8), (1, 4, 2, 8), "q heads \\(3\\) must be a multiple of kv heads \\(2\\)"),
        ((2, 4, 2, 8), (1, 4, 2, 8), "batch of q \\(2\\) and k \\(1\\) differ"),
        ((4, 2, 8), (4, 2, 8), "4-D \\[batch, seq, heads, head_dim\\]"),
    ],
)
@pytest.mark.parametrize("backend", ["sdpa", "fa"])
def test_bad_shapes_name_backend_and_cause(backend, q_shape, k_shape, match):
    q, k = torch.randn(q_shape), torch.randn(k_shape)
    with pytest.raises(ValueError, match=f"'{backend}'.*{match}"):
        attend(q, k, k.clone(), backend=backend)


def test_unsupported_dtype_names_allowed_values():
    from attnbridge.attention.backends.sage import SageImpl
    from attnbridge.attention.registry import make_impl

    impl = SageImpl.__new__(SageImpl)  # sageattention cannot be built on a CPU machine: check the limits only
    impl.backend, impl._dense = "sage", make_impl("fa", "cpu")
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(ValueError, match="'sage' does not support dtype float32; allowed: float16, bfloat16"):
        impl.check_inputs(q, q, q, causal=False, return_lse=False)
    # sageattn returns no LSE: a ring call must be refused, not served densely by fa.
    with pytest.raises(ValueError, match=r"'sage' \(.*\) cannot return the softmax LSE"):
        impl.check_inputs(q.half(), q.half(), q.half(), causal=False, return_lse=True)


def test_layer_resolves_backend_once(monkeypatch):
    from attnbridge import AttentionLayer
    from attnbridge.attention import api

    calls = []
    original = api.make_impl

    def counting_make_impl(name, platform, options=None, *, strict=False):
        calls.append(name)
        return original(name, platform, options, strict=strict)

    monkeypatch.setattr(api, "make_impl", counting_make_impl)
    layer = AttentionLayer("fa")
    q, k, v = _qkv((1, 8, 8, 2, 2, 8), torch.float32)
    for _ in range(3):
        layer(q, k, v)
    assert calls == ["fa"]


def test_unknown_device_type_is_refused():
    from attnbridge.platforms import platform_name_for_device

    with pytest.raises(ValueError, match="no attnbridge platform serves device type 'meta'"):
        platform_name_for_device(torch.device("meta"))


def test_missing_torch_npu_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail
    q, k, v = _qkv((1, 8, 8, 2, 2, 8), torch.float32)
    with pytest.raises(BackendUnavailableError, match="torch-npu"):
        attend(q, k, v, backend="fa", platform="npu")


def test_gpu_fa_falls_back_to_the_exact_kernel_when_no_fused_kernel_accepts(caplog):
    """On CPU tensors every fused aten kernel refuses, which exercises AtenFAImpl's last resort."""
    from attnbridge.attention.backends.fa import AtenFAImpl

    impl = AtenFAImpl(backend="fa", platform="cuda")
    q, k, v = _qkv((2, 17, 45, 6, 2, 32), torch.float32)
    ref_out, ref_lse = dense_reference(q, k, v, causal=True)
    with caplog.at_level("WARNING", logger="attnbridge"):
        for _ in range(2):
            out, lse = impl.forward(q, k, v, causal=True, return_lse=True)
    assert caplog.text.count("using the exact float32 reference kernel") == 1
    assert rel_l2(out, ref_out) < 1e-5
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)
    assert rel_l2(impl.forward(q, k, v, causal=True), ref_out) < 1e-5  # no LSE asked for


def test_misspelt_option_is_refused_not_ignored():
    q, k, v = _qkv((1, 8, 8, 2, 2, 64), torch.float32)
    with pytest.raises(
        ValueError, match=r"'block_sparse' does not take option\(s\) \['sparsty'\]; it accepts: sparsity"
    ):
        attend(q, k, v, backend="block_sparse", sparsty=0.9)
    with pytest.raises(ValueError, match=r"'vsa' does not take option\(s\) \['skip_first_steps'\]"):
        attend(q, k, v, backend="vsa", skip_first_steps=2)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fa_with_padded_keys_matches_reference(device, causal, dtype):
    """Key padding through ``fa`` (on CUDA: the fused kernels with a padding bias broadcast over the
    queries) equals the float64 reference on each sample's valid keys, at a length that is not a
    multiple of 16 or 128. Causal with padding: query ``i`` sees key ``j <= i`` of the valid ones
    (the triangle is aligned to the sequence, as for an unpadded batch)."""
    _check_fa_padded(device, causal, dtype)


def test_fa_cpu_reference_chunks_padded_causal_queries(monkeypatch):
    """The CPU kernel splits long query sequences into chunks; with causal attention and padding
    together each chunk must take its own rows of the combined mask (12 query chunks here)."""
    from attnbridge.attention.backends import fa

    monkeypatch.setattr(fa, "_REFERENCE_CHUNK_BYTES", 4 * 3 * 4 * 150 * 13)
    _check_fa_padded("cpu", True, torch.float32)


def _check_fa_padded(device, causal, dtype):
    q, k, v = (x.to(device) for x in _qkv((3, 150, 150, 4, 2, 64), dtype))
    lengths = [150, 97, 1]
    context = AttentionContext(key_lengths=torch.tensor(lengths, device=device))
    out, lse = attend(q, k, v, backend="fa", causal=causal, return_lse=True, context=context)
    for b, length in enumerate(lengths):
        qb, kb, vb = q[b : b + 1].cpu(), k[b : b + 1, :length].cpu(), v[b : b + 1, :length].cpu()
        head, head_lse = dense_reference(qb[:, :length], kb, vb, causal=causal)  # rows before the padding
        tail, tail_lse = dense_reference(qb[:, length:], kb, vb)  # later rows see every valid key
        ref_out, ref_lse = torch.cat([head, tail], dim=1), torch.cat([head_lse, tail_lse], dim=2)
        assert rel_l2(out[b : b + 1].cpu(), ref_out) < TOLERANCE[dtype], b
        assert torch.allclose(lse[b : b + 1].double().cpu(), ref_lse, atol=1e-2), b


def test_sage_sends_padded_calls_to_fa_and_the_rest_to_sageattn():
    """sageattn takes no key padding: a padded call runs dense ``fa`` (said at enable time), an
    unpadded one reaches sageattn (here a stand-in that records its calls)."""
    from attnbridge.attention.backends.sage import SageImpl
    from attnbridge.attention.registry import make_impl

    impl = SageImpl.__new__(SageImpl)  # sageattention cannot be built on a CPU machine
    impl.backend, impl._dense = "sage", make_impl("fa", "cpu")
    calls = []
    impl._sageattn = lambda q, k, v, **kwargs: calls.append(kwargs) or torch.zeros_like(q)
    q, k, v = _qkv((2, 40, 40, 2, 2, 64), torch.float16)
    lengths = torch.tensor([40, 23])
    out = impl.forward(q, k, v, context=AttentionContext(key_lengths=lengths))
    assert calls == []
    ref_out, _ = dense_reference(q[1:], k[1:, :23], v[1:, :23])
    assert rel_l2(out[1:], ref_out) < TOLERANCE[torch.float16]
    impl.forward(q, k, v)
    assert len(calls) == 1 and calls[0]["tensor_layout"] == "NHD"
