"""What a hostile or unlucky user does: NaN and inf, threads, enabling twice, pickling, failures half
way through enabling, empty sequences, odd option types, a missing rank. Each ends in the right
output or a clear error, never a silent wrong result or a changed model."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnbridge import AttentionContext, AttentionLayer, attend, disable_npu_attention, enable_npu_attention
from attnbridge.tiny_models import tiny_qwen3_moe, tiny_wan_pipeline, tiny_wan_transformer
from tests.tiny_inputs import wan_inputs, wan_pipeline_kwargs

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["sdpa", "fa", "sage", "laser", "block_sparse", "rain_fusion", "vsa"]
#: Grid (3, 8, 8): 192 tokens, two 128-token blocks and 4x4x4 tiles, so sparse backends are sparse.
GRID = (3, 8, 8)


def _qkv(seq=192, heads=2, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, seq, heads, dim, generator=gen) for _ in range(3))


def _layer(backend: str) -> AttentionLayer:
    return AttentionLayer(
        backend, **({"sparsity": 0.5} if backend in ("block_sparse", "rain_fusion", "vsa") else {})
    )


@torch.no_grad()
def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


# ------------------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["nan-key", "inf-key", "nan-query"])
def test_nan_and_inf_reach_the_output_as_in_torch_sdpa(backend, poison):
    if backend == "vsa" and poison == "inf-key":
        pytest.skip("a query tile that does not select the tile of an infinite key rightly never sees it")
    q, k, v = _qkv()
    if poison == "nan-key":
        k[0, 5, 1, 3] = float("nan")
    elif poison == "inf-key":
        k[0, 5, 1, 3] = float("inf")
    else:
        q[0, 7, 0, 0] = float("nan")
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    out = _layer(backend)(q, k, v, context=AttentionContext(grid=GRID))
    poisoned = expected.isnan()
    assert poisoned.any()
    if poison == "nan-query" and backend != "vsa":  # one query row: exactly that row is NaN
        assert torch.equal(out.isnan(), poisoned), backend
    elif poison == "nan-query":  # VSA's coarse term mixes the query's tile: its whole tile is NaN
        assert out[poisoned].isnan().all() and out.isnan().sum() == 48 * 64  # a 3x4x4 tile, one head
    else:  # a poisoned key is attended by every row of its head in every backend here (forced blocks)
        assert out[poisoned].isnan().all(), f"{backend} hid a non-finite input"


def test_a_nan_weight_gives_nan_as_unpatched():
    model = tiny_wan_transformer(layers=1)
    with torch.no_grad():
        model.blocks[0].attn1.to_k.weight[0, 0] = float("nan")
    inputs = wan_inputs()
    assert _run(model, inputs).isnan().all()
    enable_npu_attention(model, "fa")
    assert _run(model, inputs).isnan().all()


# ------------------------------------------------------------------------------ state and threads


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_one_patched_model_in_two_threads_keeps_each_calls_grid(device):
    """Same token count, different grids: each thread's calls must see their own grid. ``vsa`` tiles
    the tokens by the grid, so a call that read the other thread's grid gives another output."""
    model = tiny_wan_transformer(layers=2, head_dim=64).to(device)
    enable_npu_attention(model, "vsa", sparsity=0.5)
    inputs = {
        "a": wan_inputs(frames=3, height=16, width=16, seed=1),  # grid (3, 8, 8)
        "b": wan_inputs(frames=6, height=8, width=16, seed=2),  # grid (6, 4, 8): also 192 tokens
    }
    inputs = {
        name: {k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}
        for name, x in inputs.items()
    }
    alone = {name: _run(model, x) for name, x in inputs.items()}
    results, errors = {"a": [], "b": []}, []

    def work(name):
        try:
            for _ in range(6):
                results[name].append(_run(model, inputs[name]))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b", "a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name, outs in results.items():
        assert outs and all(torch.equal(out, alone[name]) for out in outs), name


def test_enable_twice_then_disable_restores_the_pipeline_class_and_pickles():
    pipe = tiny_wan_pipeline()
    pipeline_class = type(pipe)
    processors = dict(pipe.transformer.attn_processors)
    reference = pipe(**wan_pipeline_kwargs(steps=1)).frames
    for _ in range(200):
        enable_npu_attention(pipe, "sdpa")
        enable_npu_attention(pipe, "fa")
        disable_npu_attention(pipe)
    assert type(pipe) is pipeline_class
    assert all(pipe.transformer.attn_processors[k] is p for k, p in processors.items())
    assert torch.equal(pipe(**wan_pipeline_kwargs(steps=1)).frames, reference)
    pickle.dumps(pipe)


def test_a_patched_pipeline_pickles_and_runs_after_loading():
    pipe = tiny_wan_pipeline()
    enable_npu_attention(pipe, "fa")
    expected = pipe(**wan_pipeline_kwargs(steps=2)).frames
    loaded = pickle.loads(pickle.dumps(pipe))
    assert torch.allclose(loaded(**wan_pipeline_kwargs(steps=2)).frames, expected, atol=1e-6)


def test_a_patched_llm_saved_with_torch_save_loads_in_a_new_process(tmp_path):
    model = tiny_qwen3_moe()
    enable_npu_attention(model, "fa")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.save({"model": model, "ids": ids, "expected": expected}, tmp_path / "model.pt")
    script = (
        "import sys, torch, transformers\n"
        f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "with torch.no_grad():\n"
        "    logits = saved['model'](input_ids=saved['ids']).logits\n"
        "assert saved['model'].config._attn_implementation == 'attnbridge_fa'\n"
        "assert torch.allclose(logits, saved['expected'], atol=1e-5), (logits - saved['expected']).abs().max()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------ enabling is all or nothing


def test_a_limit_the_config_tells_is_refused_at_enable_and_changes_nothing():
    model = tiny_wan_transformer()  # heads of 12: VSA takes 64 or 128
    processors = dict(model.attn_processors)
    with pytest.raises(ValueError, match="'vsa' does not support head size 12"):
        enable_npu_attention(model, "vsa")
    assert all(model.attn_processors[k] is p for k, p in processors.items())
    assert not model._forward_pre_hooks


def test_a_failure_half_way_through_patching_undoes_every_change(monkeypatch):
    model = tiny_wan_transformer(layers=2)
    processors = dict(model.attn_processors)
    target = model.blocks[1].attn1
    original = type(target).set_processor

    def failing(self, processor):
        if self is target and type(processor).__module__.startswith("attnbridge"):
            raise RuntimeError("set_processor failed")
        return original(self, processor)

    monkeypatch.setattr(type(target), "set_processor", failing)
    with pytest.raises(RuntimeError, match="set_processor failed"):
        enable_npu_attention(model, "fa")
    assert all(model.attn_processors[k] is p for k, p in processors.items())
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_failed_re_enable_leaves_the_previous_backend_in_place():
    model = tiny_wan_transformer()
    first = enable_npu_attention(model, "fa")
    with pytest.raises(ValueError, match="head size 12"):
        enable_npu_attention(model, "vsa")
    assert first.enabled
    assert {layer.backend for layer in first.layers.values()} == {"fa"}
    assert type(model.blocks[0].attn1.processor).__name__ == "WanAttnBridgeProcessor"


# ------------------------------------------------------------------------------ odd inputs, odd types


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_queries_give_an_empty_output(backend):
    q, k, v = _qkv()
    out = _layer(backend)(q[:, :0], k, v)
    assert out.shape == (1, 0, 2, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_is_an_error_naming_it(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="S_kv = 0"):
        _layer(backend)(q, k[:, :0], v[:, :0])


def test_a_list_is_not_a_tensor():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="expects q as a torch tensor; got list"):
        attend(q.tolist(), k, v)


def test_numpy_scalars_are_numbers():
    q, k, v = _qkv()
    expected = attend(q, k, v, backend="block_sparse", sparsity=0.5, skip_first_steps=2)
    out = attend(q, k, v, backend="block_sparse", sparsity=np.float32(0.5), skip_first_steps=np.int64(2))
    assert torch.equal(out, expected)
    model = tiny_wan_transformer()
    enable_npu_attention(model, "block_sparse", sparsity=np.float32(0.5), skip_first_steps=np.int64(2))
    disable_npu_attention(model)


def test_a_string_is_not_a_bool():
    with pytest.raises(ValueError, match="fastvideo_kernel must be True or False; got 'false'"):
        AttentionLayer("vsa", fastvideo_kernel="false")


def test_a_list_is_not_a_sparsity():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\).*\[0.5\]"):
        attend(q, k, v, backend="block_sparse", sparsity=[0.5])


def test_a_rank_that_never_starts_fails_within_the_timeout(monkeypatch):
    """WORLD_SIZE=2 with one process: the process group times out (here after 2 s) and says how to
    fix it, instead of hanging."""
    script = (
        "import os, sys\n"
        "from attnbridge import enable_npu_attention\n"
        "from attnbridge.tiny_models import tiny_wan_transformer\n"
        "try:\n"
        "    enable_npu_attention(tiny_wan_transformer(), 'fa', ring_degree=2, platform='cpu')\n"
        "except RuntimeError as error:\n"
        "    print(error); sys.exit(3)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
        "ATTNBRIDGE_DIST_TIMEOUT": "2",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=90, env=env
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "did not start within 2 s" in done.stdout and "ATTNBRIDGE_DIST_TIMEOUT" in done.stdout


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        (torch.tensor([100, 200]), r"must be an integer tensor of shape \[1\]"),
        (torch.tensor([[100]]), r"must be an integer tensor of shape \[1\]"),
        (torch.tensor([100.5]), r"must be an integer tensor of shape \[1\]"),
        ([100], "must be a torch tensor"),
        (torch.tensor([-1]), r"must lie in \[0, 256\].*\[-1, -1\]"),
        (torch.tensor([300]), r"must lie in \[0, 256\].*\[300, 300\]"),
    ],
    ids=["two-for-one-sample", "2-D", "float", "list", "negative", "past-the-keys"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_lengths_that_do_not_fit_the_call_are_refused(backend, lengths, message):
    """Lengths of another batch, shape or range once changed the output's shape or ran silently."""
    q, k, v = (torch.randn(1, 256, 2, 64) for _ in range(3))
    context = AttentionContext(key_lengths=lengths, grid=(4, 8, 8))
    with pytest.raises(ValueError, match=f"backend '{backend}': key_lengths {message}"):
        attend(q, k, v, backend=backend, context=context)
