"""The backend x model family x platform matrix of ``attnbridge.support``, run cell by cell.

``make matrix`` runs this module and prints the grid (``tests/conftest.py`` collects the verdicts).

* Model cells: a one-layer tiny model of the family (random weights, head size 64) patched with the
  backend against its unpatched self, by relative L2, or the refusal the table names (error type and
  reason in the message, raised by ``enable_npu_attention``). Sparse backends run at sparsity 0,
  where they must keep every block; ``vsa`` is compared with exact attention plus its coarse
  (tile-mean) term, written here independently of the backend.
* Input cells: one refusal each kernel declares (a dtype, a head size, the LSE, causal), raised as
  a ``ValueError`` naming it.

Platforms: the CPU runs natively; the NPU through the emulation in ``tests/emulation`` unless a
real one is present; CUDA where a GPU is present; MUSA never (no hardware): its supported cells are
skipped, its refusals are still checked on CPU tensors with the platform forced.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator

import pytest
import torch

from attnbridge import cli, enable_npu_attention
from attnbridge.attention import AttentionLayer, observe
from attnbridge.attention.backends.fa import reference_attention
from attnbridge.attention.registry import backends
from attnbridge.errors import BackendUnavailableError
from attnbridge.platforms import get_platform
from attnbridge.tiny_models import tiny_qwen3_moe, tiny_qwen_image_transformer, tiny_wan_transformer
from tests.emulation.install import installed_fake_npu
from tests.scripts_path import KernelSupport, support_table
from tests.tiny_inputs import qwen_image_inputs, wan_inputs

#: Relative L2 error of a patched model's output against its reference, per model dtype.
#: float32: kernels differ from the unpatched model only in summation order (measured <= 3e-7).
#: bfloat16 (kernels that refuse float32): one bf16 rounding is 0.4%, and patched and unpatched
#: round at different points (measured <= 4e-3).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
#: SageAttention quantizes q and k to int8 per block; its authors report the attention output within
#: about 1e-2 relative L1 of full precision on real models, and a random-weight tiny model (no
#: outlier structure to smooth) measured 9.5e-2 rel-L2 on an H200.
INT8_QK_TOLERANCE = 0.12
HEAD_DIM = 64
OPTIONS = {name: ({"sparsity": 0.0} if spec.sparse else {}) for name, spec in backends().items()}
TABLE = support_table()
#: Cell id -> short verdict, printed as a grid by ``make matrix`` (tests/conftest.py).
VERDICTS: dict[tuple[str, str, str], str] = {}


def platform_mode(platform: str) -> str:
    """``native`` (the device is here), ``emulated`` (the NPU, through tests/emulation) or ``absent``."""
    if platform == "cpu" or get_platform(platform).is_present():
        return "native"
    return "emulated" if platform == "npu" else "absent"


@contextlib.contextmanager
def on_platform(platform: str) -> Iterator[tuple[torch.device, object]]:
    """(the device cells of ``platform`` run on, the fake NPU module or None)."""
    mode = platform_mode(platform)
    if mode == "emulated":
        with installed_fake_npu() as fake:
            yield torch.device("cpu"), fake
    else:
        yield torch.device(get_platform(platform).device_type if mode == "native" else "cpu"), None


_MODELS: dict[tuple, tuple] = {}


def tiny_model(family: str, dtype: torch.dtype, device: torch.device):
    """(model, inputs, unpatched output): one layer, head size 64; built once per (family, dtype, device)."""
    key = (family, dtype, str(device))
    if key not in _MODELS:
        if family == "wan":
            model, inputs = tiny_wan_transformer(layers=1, head_dim=HEAD_DIM), wan_inputs()
        elif family == "qwen_image":
            model, inputs = tiny_qwen_image_transformer(layers=1, head_dim=HEAD_DIM), qwen_image_inputs()
        else:
            model = tiny_qwen3_moe(layers=1, head_dim=HEAD_DIM)
            inputs = {"input_ids": torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))}
        model = model.to(device=device, dtype=dtype)
        inputs = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            if torch.is_tensor(v)
            else v
            for k, v in inputs.items()
        }
        _MODELS[key] = (model, inputs, run(model, inputs))
    return _MODELS[key]


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    if "input_ids" in inputs:
        return model(**inputs).logits
    return model(**inputs, return_dict=False)[0]


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).norm() / expected.norm())


def vsa_reference(q, k, v, grid, scale: float) -> torch.Tensor:
    """VSA with every tile kept: exact attention plus the coarse term, the softmax attention between
    4x4x4-tile means broadcast to each token of the query tile, from that definition (float32)."""
    frames, height, width = grid
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    tiles_h, tiles_w = math.ceil(height / 4), math.ceil(width / 4)
    tile = (((t // 4) * tiles_h + h // 4) * tiles_w + w // 4).flatten().to(q.device)
    n_tiles = math.ceil(frames / 4) * tiles_h * tiles_w
    counts = torch.bincount(tile, minlength=n_tiles).float()[None, :, None, None]

    def pool(x):
        sums = torch.zeros(x.shape[0], n_tiles, *x.shape[2:], device=x.device).index_add_(1, tile, x.float())
        return sums / counts

    groups = q.shape[2] // k.shape[2]
    q_bar, k_bar, v_bar = pool(q), pool(k).repeat_interleave(groups, 2), pool(v).repeat_interleave(groups, 2)
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q_bar, k_bar) * scale, dim=-1)
    coarse = torch.einsum("bhij,bjhd->bihd", probs, v_bar)
    dense = reference_attention(q, k, v, causal=False, scale=scale, return_lse=False).float()
    return (dense + coarse[:, tile]).to(q.dtype)


def cell_dtype(kernels: list[KernelSupport]) -> torch.dtype:
    """float32 when every kernel of the cell takes it, else bfloat16."""
    return torch.float32 if all(torch.float32 in k.effective.dtypes for k in kernels) else torch.bfloat16


def expected_output(backend, model, inputs, unpatched, platform, monkeypatch) -> torch.Tensor:
    if backend != "vsa":
        return unpatched
    original = AttentionLayer.__call__

    def vsa_self_attention(layer, q, k, v, **kwargs):
        context = kwargs.get("context")
        if context is None or context.kind == "cross" or context.grid is None:
            return original(layer, q, k, v, **kwargs)
        return vsa_reference(q, k, v, context.grid, q.shape[-1] ** -0.5)

    with monkeypatch.context() as patch:
        patch.setattr(AttentionLayer, "__call__", vsa_self_attention)
        with enable_npu_attention(model, "fa", platform=platform):
            return run(model, inputs)


MODEL_CELLS = [(m.backend, m.family.name, m.platform) for m in TABLE.models()]


@pytest.mark.parametrize("backend,family,platform", MODEL_CELLS, ids=["-".join(c[::-1]) for c in MODEL_CELLS])
def test_model_cell(backend, family, platform, monkeypatch):
    support = TABLE.model(backend, family, platform)
    mode = platform_mode(platform)
    if support.supported and mode == "absent":
        VERDICTS[(backend, family, platform)] = "not run"
        pytest.skip(f"not run: no {platform} device here")
    with on_platform(platform) as (device, fake):
        if not support.supported:
            model, inputs, _ = tiny_model(family, torch.float32, device)
            refusal = support.refusal
            with pytest.raises(refusal.error, match=None) as raised:
                enable_npu_attention(model, backend, platform=platform, **OPTIONS[backend])
            assert refusal.reason in str(raised.value), f"{raised.value} does not name {refusal.reason!r}"
            VERDICTS[(backend, family, platform)] = "refused"
            return
        kernels = [KernelSupport(kind.served_by, platform) for kind in support.kinds]
        dtype = cell_dtype(kernels)
        model, inputs, unpatched = tiny_model(family, dtype, device)
        requested = support.requested
        if requested.status == "fallback":
            with pytest.raises(BackendUnavailableError, match=None) as raised:
                enable_npu_attention(model, backend, platform=platform, strict=True)
            assert requested.never_runs in str(raised.value)
        expected = expected_output(backend, model, inputs, unpatched, platform, monkeypatch)
        routed = set()
        if fake is not None:
            fake.calls.clear()
        handle = enable_npu_attention(
            model, backend, platform=platform, strict=requested.status != "fallback", **OPTIONS[backend]
        )
        with handle, observe(lambda layer, q, k, context: routed.add((context.kind, layer.backend))):
            out = run(model, inputs)
            ran = {type(layer.impl_for(device)) for layer in handle.layers.values()}
        assert routed == {(kind.kind, kind.served_by) for kind in support.kinds}
        assert ran == {k.effective.impl for k in kernels}, f"kernels {ran} are not the table's"
        if fake is not None:
            assert fake.calls, "no emulated NPU op was called: the NPU path did not run"
        tolerance = TOLERANCE[dtype]
        if backend == "sage" and requested.status == "yes" and mode == "native":
            tolerance = INT8_QK_TOLERANCE
        error = rel_l2(out, expected)
        VERDICTS[(backend, family, platform)] = f"ok {error:.0e}"
        assert error <= tolerance, f"rel-L2 {error:.1e} > {tolerance:.0e} ({dtype})"


def refused_inputs(kernel: KernelSupport) -> list[str]:
    """One refusal of each kind the kernel declares."""
    effective = kernel.effective
    if effective.impl is None:
        return []
    checks = [f"dtype-{str(d).removeprefix('torch.')}" for d in effective.refused_dtypes()]
    if effective.head_sizes is not None:
        checks.append(
            f"head-{next(size for size in (16, 48, 80, 256, 72) if size not in effective.head_sizes)}"
        )
    checks += [] if effective.lse else ["lse"]
    checks += [] if effective.causal else ["causal"]
    return checks


INPUT_CELLS = [(k.backend, k.platform, check) for k in TABLE.kernels() for check in refused_inputs(k)]
MESSAGES = {
    "dtype": "does not support dtype {}",
    "head": "does not support head size {}",
    "lse": "cannot return the softmax LSE",
    "causal": "does not support causal attention",
}


@pytest.mark.parametrize("backend,platform,check", INPUT_CELLS, ids=["-".join(c) for c in INPUT_CELLS])
def test_input_refusal(backend, platform, check):
    kind, _, value = check.partition("-")
    kernel = KernelSupport(backend, platform)
    dtype = getattr(torch, value) if kind == "dtype" else None
    if dtype is None:
        dtype = torch.float32 if torch.float32 in kernel.effective.dtypes else torch.bfloat16
    head = int(value) if kind == "head" else HEAD_DIM
    with on_platform(platform) as (device, _):
        q, k, v = (torch.randn(1, 8, 2, head).to(device=device, dtype=dtype) for _ in range(3))
        layer = AttentionLayer(
            backend, platform=platform, strict=kernel.status != "fallback", **OPTIONS[backend]
        )
        try:
            layer(q, k, v, causal=kind == "causal", return_lse=kind == "lse")
        except BackendUnavailableError as error:
            assert error.install, error
            pytest.skip(f"needs {error.install}")
        except ValueError as error:
            assert MESSAGES[kind].format(value) in str(error)
            return
    pytest.fail(f"expected a ValueError saying {MESSAGES[kind].format(value)!r}; it ran")


def test_every_backend_family_and_platform_has_a_cell():
    assert {(b, f) for b, f, _ in MODEL_CELLS} == {(b, f.name) for b in backends() for f in TABLE.families}
    assert {p for _, _, p in MODEL_CELLS} == {"cpu", "npu", "cuda", "musa"}


def test_vsa_reference_adds_the_mean_of_v_when_one_tile_holds_every_token():
    """One 2x2x2 tile: the coarse softmax has one entry, so the coarse term is the mean of v (guards
    the reference the vsa cells are compared with)."""
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    dense = reference_attention(q, k, v, causal=False, scale=0.25, return_lse=False)
    assert torch.allclose(
        vsa_reference(q, k, v, (2, 2, 2), 0.25), dense + v.mean(dim=1, keepdim=True), atol=1e-5
    )


def test_install_commands_are_what_the_kernels_ask_for(monkeypatch):
    """Without any optional package, each kernel's error names the first package it declares."""
    from attnbridge.attention.sparse import triton_kernel

    for name in ("torch_npu", "attentions", "sgl_kernel_npu", "sageattention"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    monkeypatch.setattr(triton_kernel, "triton", None)  # as where triton is not installed
    for kernel in TABLE.kernels():
        if kernel.impl is None or kernel.never_runs:
            continue
        try:
            kernel.impl.check_available(kernel.platform)
        except BackendUnavailableError as error:
            assert kernel.install[:1] == (error.install,), kernel
        else:
            assert not kernel.install, f"{kernel.impl_name} runs without {kernel.install}"


def test_backends_command_shows_every_backend_on_every_platform(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for kernel in TABLE.kernels():
        block = out.split(f"\n{kernel.backend} (", 1)[1].split("\n\n", 1)[0]
        line = next(ln for ln in block.splitlines() if ln[3:].startswith(kernel.platform))
        if kernel.status == "no":
            assert f"no: {kernel.unavailable}" in line
        elif kernel.status == "fallback":
            assert f"runs '{kernel.fallback}' instead: {kernel.never_runs}" in line
        else:
            assert kernel.impl.description in line
        assert "Impl" not in line, "internal class names are not for users"
