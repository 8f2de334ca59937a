"""The Ascend paths of laser, block_sparse and rain_fusion, on the CPU emulation of their kernels.

Two things are checked: the emulated kernels follow their documented semantics (against the
independent float64 reference), and attnbridge calls them with the right arguments and gets the
right answer: the same blocks as the CPU/CUDA path, outputs within bfloat16 rounding of it
(relative L2 <= 1.5e-2 vs float64), Laser within fp16 rounding (3e-3) for fp16 input and within
bfloat16 rounding for bfloat16 input, values beyond fp16's range included.

sgl-kernel-npu ships its kernels in two layouts: newer builds under ``torch.ops.npu`` (``import
sgl_kernel_npu``: ``laser_attn``, ``ada_block_sparse_attention``), older ones under
``torch.ops.attentions`` (``import attentions``: ``la``, ``ada_block_sparse_attention`` or
``block_sparse_attention``, ``rainfusionattention``). The Laser and block_sparse tests run against
each layout and both installed together, where the newer one must win.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from attnbridge import AttentionLayer, attend, notices
from attnbridge.attention.backends import block_sparse, rain_fusion
from attnbridge.attention.backends.laser import LASER_OPS, NpuLaserImpl
from attnbridge.attention.contract import AttentionContext
from attnbridge.attention.options import kept_count
from attnbridge.attention.sparse.ascend import ASCEND_BLOCK_SPARSE, ASCEND_RAIN_FUSION, BLOCK_SPARSE_OPS
from attnbridge.attention.sparse.flex import FLEX
from attnbridge.attention.sparse.selection import mask_to_selection
from attnbridge.errors import BackendUnavailableError
from attnbridge.platforms.npu import load_kernel_op
from tests.emulation import fake_attentions_ops as ops
from tests.emulation.fake_torch_npu_sparse import npu_block_sparse_attention
from tests.emulation.reference import dense_reference, rel_l2

BF16_TOL = 1.5e-2
FP16_TOL = 3e-3
GRID = (3, 8, 40)  # 960 tokens, first frame = 3 blocks
CONTEXT = AttentionContext(kind="self", grid=GRID, step=7)
CPU = torch.device("cpu")
#: Every way sgl-kernel-npu can be installed; with both, the newer torch.ops.npu layout wins.
ALL_LAYOUTS = ["attentions", "sgl_kernel_npu", "both"]
#: The torch.ops namespace attnbridge must call the kernels from, per installed layout.
NAMESPACE = {"attentions": "attentions", "sgl_kernel_npu": "npu", "both": "npu"}
LASER_OP = {"attentions": "la", "npu": "laser_attn"}


def _qkv(batch, seq, heads, kv_heads, dim, dtype=torch.bfloat16):
    return (
        torch.randn(batch, seq, heads, dim).to(dtype),
        torch.randn(batch, seq, kv_heads, dim).to(dtype),
        torch.randn(batch, seq, kv_heads, dim).to(dtype),
    )


def _bnsd(x):
    return x.transpose(1, 2).contiguous()


def _calls(fake, name, namespace=None):
    """(args, kwargs) of each recorded call of op ``name`` (in ``namespace`` if given)."""
    return [
        (args, kwargs)
        for call in fake.calls
        for op, args, kwargs in [call]
        if op == name and (namespace is None or call.namespace == namespace)
    ]


def _ops_called(fake):
    return [(op, call.namespace) for call in fake.calls for op, _, _ in [call]]


def block_masked_reference(q, k, v, block_mask, block_size=128, scale=None):
    """float64 BSHD attention over the kept blocks of ``block_mask`` [B, H, nq, nk]."""
    s = q.shape[1]
    group = q.shape[2] // k.shape[2]
    visible = block_mask.repeat_interleave(block_size, -2)[..., :s, :].repeat_interleave(block_size, -1)[
        ..., :s
    ]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v64)


# ---------------------------------------------------------------------------------------------
# The emulated kernels themselves


@pytest.mark.parametrize(("op", "multiple"), [(ops.la, 256), (ops.laser_attn, 128)])
def test_emulated_laser_ignores_the_pre_tokens_padding(op, multiple):
    q, k, v = _qkv(1, 300, 2, 2, 64, torch.float32)
    padded = [
        torch.nn.functional.pad(_bnsd(x), (0, 64, 0, 512 - 300)).half() for x in (q, k, v)
    ]  # S 300 -> 512, D 64 -> 128
    lse, out = op(*padded, scale_value=0.125, head_num=2, pre_tokens=212)
    assert out.dtype == torch.float32 and lse.shape == (1, 2, 512)
    ref, _ = dense_reference(q, k, v)
    assert rel_l2(out[:, :, :300, :64].transpose(1, 2), ref) < FP16_TOL
    with pytest.raises(RuntimeError, match=f"multiples of {multiple}"):
        op(*(x[:, :, :300] for x in padded), head_num=2)


def test_emulated_la_refuses_window_values_it_does_not_model():
    """Only the window values sglang passes are emulated; other values are refused, not guessed."""
    padded = [torch.nn.functional.pad(torch.randn(1, 2, 300, 128), (0, 0, 0, 212)).half() for _ in range(3)]
    with pytest.raises(NotImplementedError, match="next_tokens=0 is not emulated"):
        ops.la(*padded, head_num=2, pre_tokens=212, next_tokens=0)
    with pytest.raises(NotImplementedError, match="pre_tokens=214748647 is not emulated"):
        ops.la(*padded, head_num=2, pre_tokens=214748647)
    with pytest.raises(RuntimeError, match="last 250 key/value rows are not zero padding"):
        ops.la(*padded, head_num=2, pre_tokens=250)  # 212 rows are padding, not 250
    with pytest.raises(RuntimeError, match="overflows the kernel's fp16 scale"):
        ops.la(*padded, head_num=2, pre_tokens=212, scale_value=65536.0)


@pytest.mark.parametrize("op", [ops.block_sparse_attention, ops.ada_block_sparse_attention])
def test_emulated_block_sparse_kernel_follows_the_mask(op):
    q, k, v = _qkv(2, 300, 4, 2, 64)
    mask = torch.rand(2, 4, 3, 3) < 0.5
    mask[..., 0] = True
    mask_i8 = torch.nn.functional.pad(mask.to(torch.int8), (0, 29))
    counts = mask.sum(-1, dtype=torch.int32)
    out = op(
        _bnsd(q),
        _bnsd(k),
        _bnsd(v),
        mask_i8,
        counts,
        num_heads=4,
        num_key_value_heads=2,
        scale_value=0.125,
        causal=False,
        pre_tokens=214748647,
        next_tokens=214748647,
    )
    assert rel_l2(out.transpose(1, 2), block_masked_reference(q, k, v, mask)) < BF16_TOL
    with pytest.raises(RuntimeError, match="sparse_mask must be"):
        op(_bnsd(q), _bnsd(k), _bnsd(v), mask.to(torch.int8), counts, num_heads=4, num_key_value_heads=2)
    with pytest.raises(RuntimeError, match="count_table"):
        op(_bnsd(q), _bnsd(k), _bnsd(v), mask_i8, counts + 1, num_heads=4, num_key_value_heads=2)


def test_emulated_rainfusion_and_torch_npu_kernels_follow_the_mask():
    q, k, v = _qkv(1, 300, 2, 2, 64)
    mask = torch.rand(1, 2, 3, 3) < 0.5
    mask[..., 1] = True
    ref = block_masked_reference(q, k, v, mask)
    selection = mask_to_selection(mask)
    listed = torch.arange(3) < selection.counts[..., None]
    idx = torch.where(listed, selection.indices.long(), -1)[0].transpose(0, 1).contiguous()
    out, _ = ops.rainfusionattention(
        q[0], k[0], v[0], idx, selection.counts.long()[0].T.contiguous(), [128, 128],
        actual_seq_qlen=[300], actual_seq_kvlen=[300], head_num=2, scale=0.125,
    )  # fmt: skip
    assert rel_l2(out[None], ref) < BF16_TOL
    out, lse = npu_block_sparse_attention(
        _bnsd(q), _bnsd(k), _bnsd(v), mask.to(torch.int8), [128, 128], q_input_layout="BNSD",
        kv_input_layout="BNSD", num_key_value_heads=2, scale_value=0.125, inner_precise=0, softmax_lse_flag=1,
    )  # fmt: skip
    assert rel_l2(out.transpose(1, 2), ref) < BF16_TOL and lse.shape == (1, 2, 300, 1)
    with pytest.raises(RuntimeError, match="bfloat16 supports only inner_precise=0"):
        npu_block_sparse_attention(_bnsd(q), _bnsd(k), _bnsd(v), mask.to(torch.int8), [128, 128], q_input_layout="BNSD", kv_input_layout="BNSD", num_key_value_heads=2)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Which kernel a layer gets, and where it is found


def test_npu_impls_compose_the_cpu_selectors_with_the_ascend_kernels(fake_npu):
    """Same selector on every platform (so the same blocks), the Ascend kernel on the NPU."""
    for backend, kernel in ((block_sparse, ASCEND_BLOCK_SPARSE), (rain_fusion, ASCEND_RAIN_FUSION)):
        npu = type(AttentionLayer(backend.BACKEND.name, platform="npu").impl_for(CPU))
        cpu = type(AttentionLayer(backend.BACKEND.name).impl_for(CPU))
        assert npu.kernel is kernel and cpu.kernel is FLEX and npu.selector is cpu.selector
    assert isinstance(AttentionLayer("laser", platform="npu").impl_for(CPU), NpuLaserImpl)


@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_kernel_ops_are_looked_up_newest_layout_first(fake_npu_layout):
    namespace = NAMESPACE[fake_npu_layout.layout]
    laser = load_kernel_op("laser", LASER_OPS)
    assert laser.qualified_name == f"torch.ops.{namespace}.{LASER_OP[namespace]}"
    assert laser.package == {"npu": "sgl_kernel_npu", "attentions": "attentions"}[namespace]
    sparse = load_kernel_op("block_sparse", BLOCK_SPARSE_OPS)
    assert sparse.qualified_name == f"torch.ops.{namespace}.ada_block_sparse_attention"


@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_backends_command_names_the_ops_found(fake_npu_layout, capsys, monkeypatch):
    from attnbridge import cli
    from attnbridge.platforms import PLATFORMS

    monkeypatch.setattr("attnbridge.platforms.detect_platform", lambda: PLATFORMS["npu"])
    namespace = NAMESPACE[fake_npu_layout.layout]
    assert cli.main(["backends"]) == 0
    found = capsys.readouterr().out.splitlines()[-1]
    assert found.startswith("sgl-kernel-npu ops found here: ")
    assert f"laser torch.ops.{namespace}.{LASER_OP[namespace]}" in found
    assert f"block_sparse torch.ops.{namespace}.ada_block_sparse_attention" in found


def test_a_missing_kernel_names_every_layout_and_op_tried(fake_npu, monkeypatch):
    monkeypatch.delattr(torch.ops.attentions, "la")
    with pytest.raises(
        BackendUnavailableError, match=r"import sgl_kernel_npu .*; torch\.ops\.attentions\.la"
    ):
        load_kernel_op("laser", LASER_OPS)


# ---------------------------------------------------------------------------------------------
# block_sparse on Ascend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_block_sparse_npu_passes_our_mask_to_the_kernel(fake_npu_layout, dtype):
    fake, namespace = fake_npu_layout, NAMESPACE[fake_npu_layout.layout]
    q, k, v = _qkv(2, 960, 4, 2, 64, dtype)
    out = attend(q, k, v, backend="block_sparse", platform="npu", context=CONTEXT, sparsity=0.75)
    assert _ops_called(fake) == [("ada_block_sparse_attention", namespace)]
    ((args, kwargs),) = _calls(fake, "ada_block_sparse_attention")
    assert [a.shape for a in args] == [(2, 4, 960, 64), (2, 2, 960, 64), (2, 2, 960, 64)]
    assert all(a.is_contiguous() and a.dtype == dtype for a in args)
    mask_i8, counts = kwargs["sparse_mask"], kwargs["sparse_count_table"]
    assert mask_i8.dtype == torch.int8 and mask_i8.shape == (2, 4, 8, 32)
    assert kwargs["input_layout"] == "BNSD" and kwargs["sparse_size"] == 128 and kwargs["causal"] is False
    assert (kwargs["num_heads"], kwargs["num_key_value_heads"]) == (4, 2)
    assert kwargs["scale_value"] == pytest.approx(1 / 8)
    assert kwargs["inner_precise"] == 1  # the only tiling with float16 kernels
    assert kwargs["pre_tokens"] == kwargs["next_tokens"] == 214748647
    mask = mask_i8[..., :8].bool()
    assert torch.equal(counts, mask.sum(-1, dtype=torch.int32)) and not mask_i8[..., 8:].any()
    # The same blocks as the CPU/CUDA path, and the right attention over them.
    cpu = attend(q, k, v, backend="block_sparse", context=CONTEXT, sparsity=0.75)
    assert rel_l2(out, cpu) < BF16_TOL
    assert out.dtype == dtype and rel_l2(out, block_masked_reference(q, k, v, mask)) < BF16_TOL
    assert (mask.sum(dim=(-1, -2)) == kept_count(0.75, 64)).all()  # each head: 16 of 8 x 8 pairs


def test_block_sparse_npu_uses_the_older_op_name(fake_npu, monkeypatch):
    monkeypatch.delattr(torch.ops.attentions, "ada_block_sparse_attention")
    q, k, v = _qkv(1, 960, 2, 2, 64)
    out = attend(q, k, v, backend="block_sparse", platform="npu", context=CONTEXT, sparsity=0.5)
    assert _ops_called(fake_npu) == [("block_sparse_attention", "attentions")]
    assert rel_l2(out, attend(q, k, v, backend="block_sparse", context=CONTEXT, sparsity=0.5)) < BF16_TOL


def test_block_sparse_npu_without_either_op_names_them(fake_npu, monkeypatch):
    monkeypatch.delattr(torch.ops.attentions, "ada_block_sparse_attention")
    monkeypatch.delattr(torch.ops.attentions, "block_sparse_attention")
    q, k, v = _qkv(1, 960, 2, 2, 64)
    tried = (
        r"torch\.ops\.attentions\.ada_block_sparse_attention; torch\.ops\.attentions\.block_sparse_attention"
    )
    with pytest.raises(BackendUnavailableError, match=tried):
        attend(q, k, v, backend="block_sparse", platform="npu", strict=True, context=CONTEXT, sparsity=0.5)


@pytest.mark.parametrize("backend", ["block_sparse", "rain_fusion"])
def test_npu_dense_steps_lse_padding_and_cross_attention_run_fia(fake_npu, backend):
    q, k, v = _qkv(1, 960, 2, 2, 64)
    layer = AttentionLayer(backend, platform="npu", sparsity=0.75, skip_first_steps=5)
    dense = layer(q, k, v, context=AttentionContext(grid=GRID, step=4))
    flagged = layer(q, k, v, context=AttentionContext(grid=GRID, step=9, dense_step=True))
    out, lse = layer(q, k, v, context=CONTEXT, return_lse=True)  # the Ascend kernels return no LSE
    padded = layer(q, k, v, context=AttentionContext(grid=GRID, step=9, key_lengths=torch.tensor([700])))
    _, k_text, v_text = _qkv(1, 77, 2, 2, 64)
    layer(q, k_text, v_text, context=AttentionContext(kind="cross", grid=GRID, step=9))
    assert [op for op, _, _ in fake_npu.calls] == ["npu_fused_infer_attention_score"] * 5
    ref, ref_lse = dense_reference(q, k, v)
    assert rel_l2(dense, ref) < BF16_TOL and rel_l2(out, ref) < BF16_TOL and torch.equal(flagged, dense)
    assert torch.allclose(lse.double(), ref_lse, atol=2e-2)
    assert rel_l2(padded, dense_reference(q, k, v, kv_lengths=[700])[0]) < BF16_TOL


# ---------------------------------------------------------------------------------------------
# rain_fusion on Ascend


def test_rain_fusion_npu_calls_torch_npu_block_sparse_attention(fake_npu):
    q, k, v = _qkv(2, 960, 4, 2, 64)
    out = attend(q, k, v, backend="rain_fusion", platform="npu", context=CONTEXT, sparsity=0.75)
    ((args, kwargs),) = _calls(fake_npu, "npu_block_sparse_attention")
    assert _ops_called(fake_npu) == [("npu_block_sparse_attention", "torch_npu")]
    assert [a.shape for a in args[:3]] == [(2, 4, 960, 64), (2, 4, 960, 64), (2, 4, 960, 64)]  # K/V repeated
    mask, block_shape = args[3], args[4]
    assert mask.dtype == torch.int8 and mask.shape == (2, 4, 8, 8) and block_shape == [128, 128]
    assert kwargs["q_input_layout"] == kwargs["kv_input_layout"] == "BNSD"
    assert kwargs["num_key_value_heads"] == 4 and kwargs["inner_precise"] == 0
    assert kwargs["actual_seq_lengths"] == kwargs["actual_seq_lengths_kv"] == [960, 960]
    assert kwargs["softmax_lse_flag"] == 0
    cpu = attend(q, k, v, backend="rain_fusion", context=CONTEXT, sparsity=0.75)
    assert rel_l2(out, cpu) < BF16_TOL


def test_rain_fusion_npu_passes_inner_precise_4_on_ascend_950(fake_npu, monkeypatch):
    monkeypatch.setattr(fake_npu.npu, "get_soc_version", lambda: 260)
    q, k, v = _qkv(1, 960, 2, 2, 64)
    attend(q, k, v, backend="rain_fusion", platform="npu", context=CONTEXT, sparsity=0.5)
    ((_, kwargs),) = _calls(fake_npu, "npu_block_sparse_attention")
    assert kwargs["inner_precise"] == 4


def test_rain_fusion_npu_falls_back_to_the_attentions_kernel_per_batch(fake_npu, monkeypatch):
    monkeypatch.delattr(fake_npu, "npu_block_sparse_attention")
    q, k, v = _qkv(2, 960, 4, 2, 64)
    out = attend(q, k, v, backend="rain_fusion", platform="npu", context=CONTEXT, sparsity=0.75)
    calls = _calls(fake_npu, "rainfusionattention", "attentions")
    assert len(calls) == 2  # one per batch element: each gets its own selection
    args, kwargs = calls[0]
    assert [a.shape for a in args] == [(960, 4, 64)] * 3  # TND, K/V heads repeated to 4
    assert kwargs["select_idx"].shape == (8, 4, 8) and kwargs["select_idx"].dtype == torch.int64
    assert kwargs["select_num_idx"].shape == (8, 4) and kwargs["head_num"] == 4
    assert kwargs["actual_seq_qlen"] == kwargs["actual_seq_kvlen"] == [960]
    assert kwargs["blockshape"] == [128, 128] and kwargs["q_input_layout"] == "TND"
    cpu = attend(q, k, v, backend="rain_fusion", context=CONTEXT, sparsity=0.75)
    assert rel_l2(out, cpu) < BF16_TOL


@pytest.mark.parametrize("fake_npu", ["sgl_kernel_npu"], indirect=True)
def test_rain_fusion_npu_without_either_kernel_names_what_it_tried(fake_npu, monkeypatch):
    """The newer layout has no rainfusionattention: with an old torch_npu nothing can run it."""
    monkeypatch.delattr(fake_npu, "npu_block_sparse_attention")
    q, k, v = _qkv(1, 960, 2, 2, 64)
    with pytest.raises(BackendUnavailableError, match=r"'rain_fusion'.*import attentions"):
        attend(q, k, v, backend="rain_fusion", platform="npu", context=CONTEXT, sparsity=0.5)


# ---------------------------------------------------------------------------------------------
# laser on Ascend


@pytest.mark.parametrize(("seq", "pre_tokens"), [(2100, 204), (2304, 2**31 - 1)])
@pytest.mark.parametrize(
    ("dtype", "shift", "tol"), [(torch.bfloat16, 256, BF16_TOL), (torch.float16, 1, FP16_TOL)]
)
@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_laser_npu_pads_casts_and_passes_pre_tokens(fake_npu_layout, seq, pre_tokens, dtype, shift, tol):
    """bf16 reaches the kernel divided by 256 (fp16 range) with the scale times 256**2; fp16 as is."""
    fake, namespace = fake_npu_layout, NAMESPACE[fake_npu_layout.layout]
    q, k, v = _qkv(1, seq, 4, 2, 64, dtype)
    out = attend(q, k, v, backend="laser", platform="npu")
    assert _ops_called(fake) == [(LASER_OP[namespace], namespace)]
    ((args, kwargs),) = _calls(fake, LASER_OP[namespace])
    padded = math.ceil(seq / 256) * 256
    assert [a.shape for a in args] == [(1, 4, padded, 128)] * 3  # K/V heads repeated to 4
    assert all(a.dtype == torch.float16 for a in args)
    assert torch.equal(args[0][:, :, :seq, :64], (q.float() / shift).half().transpose(1, 2))
    assert kwargs["pre_tokens"] == pre_tokens and kwargs["next_tokens"] == 1
    assert kwargs["head_num"] == 4 and kwargs["input_layout"] == "BNSD"
    # 1/sqrt of the real head_dim, not the padded one; times 256**2 for the shifted q and k.
    assert kwargs["scale_value"] == pytest.approx(shift * shift / 8)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_l2(out, dense_reference(q, k, v)[0]) < tol


@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_laser_npu_keeps_bf16_values_beyond_the_fp16_range(fake_npu_layout):
    """bf16 values around 1e5 (fp16 stops at 65504) give a finite output, right to bf16 rounding.

    Channel 0 of every key is the same 1e5, so it shifts a query's scores equally (softmax ignores
    it) and the attention stays well conditioned; v is ~1e5 throughout.
    """
    namespace = NAMESPACE[fake_npu_layout.layout]
    q, k, v = _qkv(1, 2100, 2, 2, 64)
    k[..., 0] = 1e5
    v = (v.float() * 1e5).bfloat16()
    assert not torch.isfinite(k.half()).all() and not torch.isfinite(v.half()).all()  # plain cast: inf
    out = attend(q, k, v, backend="laser", platform="npu")
    assert _ops_called(fake_npu_layout) == [(LASER_OP[namespace], namespace)]
    assert torch.isfinite(out).all()
    assert rel_l2(out, dense_reference(q, k, v)[0]) < BF16_TOL


@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_laser_npu_takes_a_prescaled_bf16_query_with_scale_1(fake_npu_layout):
    """q already multiplied by 1/sqrt(D) and ``scale=1.0`` (as some pipelines call it): a shift of
    256 would give the kernel a scale of 65536, past its fp16; the shift drops to 128 (scale 16384)
    and the result is finite and right."""
    namespace = NAMESPACE[fake_npu_layout.layout]
    q, k, v = _qkv(1, 2100, 4, 2, 64)
    q = (q.float() / 8).bfloat16()
    out = attend(q, k, v, backend="laser", platform="npu", scale=1.0)
    ((args, kwargs),) = _calls(fake_npu_layout, LASER_OP[namespace], namespace)
    assert kwargs["scale_value"] == 128 * 128
    assert torch.equal(args[0][:, :, :2100, :64], (q.float() / 128).half().transpose(1, 2))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_l2(out, dense_reference(q, k, v, scale=1.0)[0]) < BF16_TOL


@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_laser_npu_runs_fia_for_a_scale_fp16_cannot_hold(fake_npu_layout, caplog, monkeypatch):
    monkeypatch.setattr(notices, "_given", set())
    q, k, v = _qkv(1, 2304, 2, 2, 64)
    q = (q.float() * 1e-3).bfloat16()
    with caplog.at_level(logging.WARNING, logger="attnbridge"):
        out = attend(q, k, v, backend="laser", platform="npu", scale=1e5)
    assert "softmax scale 100000 does not fit the kernel's float16 scale" in caplog.text
    assert _ops_called(fake_npu_layout) == [("npu_fused_infer_attention_score", "torch_npu")]
    assert torch.isfinite(out).all() and rel_l2(out, dense_reference(q, k, v, scale=1e5)[0]) < BF16_TOL


@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_laser_npu_serves_key_padding_one_sample_at_a_time(fake_npu_layout):
    """2100 tokens (256-aligned: 2304). Sample 0 keeps 2070 keys: the kernel masks its last 234 keys
    through ``pre_tokens``. Sample 1 keeps 1900: 404 padded keys pass the 256-key tail, so it runs
    dense FIA with its length."""
    namespace = NAMESPACE[fake_npu_layout.layout]
    lengths = [2070, 1900]
    q, k, v = _qkv(2, 2100, 4, 2, 64)
    for b, n in enumerate(lengths):
        k[b, n:], v[b, n:] = 30.0, 1e4  # would swamp the output if seen
    context = AttentionContext(key_lengths=torch.tensor(lengths))
    out = attend(q, k, v, backend="laser", platform="npu", context=context)
    assert _ops_called(fake_npu_layout) == [
        (LASER_OP[namespace], namespace),
        ("npu_fused_infer_attention_score", "torch_npu"),
    ]
    ((args, kwargs),) = _calls(fake_npu_layout, LASER_OP[namespace], namespace)
    assert [a.shape for a in args] == [(1, 4, 2304, 128)] * 3 and kwargs["pre_tokens"] == 2304 - 2070
    ((_, fia),) = _calls(fake_npu_layout, "npu_fused_infer_attention_score")
    assert fia["actual_seq_lengths_kv"] == [1900]
    for b, n in enumerate(lengths):
        want = dense_reference(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n])[0]
        assert rel_l2(out[b : b + 1], want) < BF16_TOL, b


def test_laser_npu_refuses_key_lengths_past_the_keys(fake_npu):
    """On an NPU the call's own check cannot read the lengths (that would sync); the Laser path,
    which reads them on the host anyway, names a bad one."""
    from attnbridge.attention.registry import make_impl

    q, k, v = _qkv(1, 2100, 2, 2, 64)
    context = AttentionContext(key_lengths=torch.tensor([2101]))
    with pytest.raises(ValueError, match=r"'laser': key_lengths must lie in \[0, 2100\]; got 2101"):
        make_impl("laser", "npu").forward(q, k, v, context=context)
    assert fake_npu.calls == []


def test_laser_npu_short_and_cross_calls_run_fia(fake_npu):
    q, k, v = _qkv(1, 1000, 2, 2, 64)
    attend(q, k, v, backend="laser", platform="npu")
    q_long = torch.randn(1, 4096, 2, 64).bfloat16()
    attend(q_long, k, v, backend="laser", platform="npu")
    assert [op for op, _, _ in fake_npu.calls] == ["npu_fused_infer_attention_score"] * 2


@pytest.mark.parametrize("fake_npu_layout", ALL_LAYOUTS, indirect=True)
def test_laser_npu_is_unavailable_on_ascend_950(fake_npu_layout, monkeypatch):
    monkeypatch.setattr(fake_npu_layout.npu, "get_soc_version", lambda: 260)
    q, k, v = _qkv(1, 2304, 2, 2, 64)
    with pytest.raises(BackendUnavailableError, match="Ascend 950"):
        attend(q, k, v, backend="laser", platform="npu")
