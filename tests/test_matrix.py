"""The backend x model x platform matrix of ``attnbridge.support``, run cell by cell (what
``make matrix`` prints), and the stated facts of the table checked against the code.

Model cells: a one-layer tiny model patched with the backend vs unpatched (relative L2 within
``attnbridge.matrix.TOLERANCE``: 1e-5 in float32, 2e-2 in bfloat16), or the documented refusal (error
type and the table's reason in the message). NPU cells run against ``tests/emulation``; CUDA and MUSA
cells that need the device are skipped with the table's "not run" reason.
"""

from __future__ import annotations

import sys

import pytest
import torch

from attnbridge import cli
from attnbridge.attention.registry import BACKENDS
from attnbridge.errors import BackendUnavailableError
from attnbridge.matrix import ModelPool, all_cells, run_cell, vsa_reference
from attnbridge.support import (
    INSTALL,
    KERNEL_NOTES,
    OPTION_HELP,
    OPTIONAL_PACKAGES,
    PLATFORM_FACTS,
    support_table,
)

TABLE = support_table()
CELLS = all_cells(TABLE)
OPTIONAL_IMPORTS = ("torch_npu", "attentions", "sageattention")


@pytest.fixture(scope="module")
def pool():
    return ModelPool()


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_matrix_cell(cell, pool):
    result = run_cell(cell, TABLE, pool)
    if result.status == "not run":
        pytest.skip(result.detail)
    assert result.status in ("ok", "refused"), f"{cell.id}: {result.detail}"


def test_every_backend_family_and_platform_has_cells():
    model_cells = {(c.backend, c.family, c.platform) for c in CELLS if c.family}
    assert model_cells == {(b, f.name, p) for b in BACKENDS for f in TABLE.families for p in PLATFORM_FACTS}


def test_vsa_reference_adds_the_mean_of_v_when_one_tile_holds_every_token():
    """One 2x2x2 tile: the coarse softmax has one entry, so the coarse term is the mean of v (guards
    the reference the vsa cells are compared with)."""
    from attnbridge.attention.backends.fa import reference_attention

    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    dense = reference_attention(q, k, v, causal=False, scale=0.25, return_lse=False)
    expected = dense + v.mean(dim=1, keepdim=True)
    assert torch.allclose(vsa_reference(q, k, v, (2, 2, 2), 0.25), expected, atol=1e-5)


# ---------------------------------------------------------------- stated facts vs the code


def _hide_optional_packages(monkeypatch):
    for name in OPTIONAL_IMPORTS:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail


def _impls():
    return {k.impl_name: k for k in TABLE.kernels() if k.impl is not None}


def test_install_commands_are_what_the_kernels_ask_for(monkeypatch):
    """Without any optional package, each kernel's error names the first command of INSTALL; kernels
    not in INSTALL need none."""
    _hide_optional_packages(monkeypatch)
    for name, kernel in _impls().items():
        if kernel.never_runs:
            continue
        try:
            kernel.impl.check_available(kernel.platform)
        except BackendUnavailableError as error:
            assert name in INSTALL, f"{name} asks for {error.install!r}; add it to INSTALL"
            assert error.install == INSTALL[name][0], name
        else:
            assert name not in INSTALL, f"{name} runs without {INSTALL.get(name)}"


def test_second_install_command_with_torch_npu_present(fake_npu, monkeypatch):
    monkeypatch.setitem(sys.modules, "attentions", None)
    for name, kernel in _impls().items():
        if kernel.platform != "npu" or kernel.never_runs:
            continue
        try:
            kernel.impl.check_available("npu")
        except BackendUnavailableError as error:
            assert INSTALL[name][1:2] == (error.install,), name
        else:
            assert len(INSTALL.get(name, ())) <= 1, name


def test_stated_names_refer_to_existing_kernels_and_options():
    names = set(_impls())
    assert set(INSTALL) <= names and set(KERNEL_NOTES) <= names
    kernels = {(k.impl_name, k.platform) for k in TABLE.kernels()}
    assert set(OPTIONAL_PACKAGES) <= kernels
    options = {o for spec in BACKENDS.values() for o in spec.options}
    assert options == set(OPTION_HELP), "every backend option needs a line in OPTION_HELP (and no stale ones)"


# ---------------------------------------------------------------- `attnbridge backends` agrees


def _backends_output(capsys) -> dict[str, dict[str, str]]:
    """backend -> platform -> its line of `attnbridge backends`."""
    assert cli.main(["backends"]) == 0
    lines, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        head = line.split(" (", 1)[0]
        if head in BACKENDS and not line.startswith(" "):
            current = lines.setdefault(head, {})
        elif current is not None and line.strip():
            words = [w for w in line.split()[:2] if w not in ("*", "+")]
            if words and words[0] in PLATFORM_FACTS:
                current[words[0]] = line
    return lines


def test_backends_command_agrees_with_the_table(capsys):
    output = _backends_output(capsys)
    assert set(output) == set(BACKENDS)
    for kernel in TABLE.kernels():
        line = output[kernel.backend][kernel.platform]
        where = f"{kernel.backend} on {kernel.platform}: {line!r}"
        if kernel.unavailable:
            assert "no: " in line and kernel.unavailable in line, where
        elif kernel.status == "fallback":
            if "not this machine" in line:
                assert kernel.impl_name in line and f"falls back to {kernel.kernel.fallback!r}" in line, where
            else:
                assert f"falls back to {kernel.kernel.fallback!r}" in line and kernel.never_runs in line, (
                    where
                )
        elif "not this machine" in line:
            assert kernel.impl_name in line, where
        else:
            described = line.split(kernel.platform, 1)[1].strip()
            # "no"/"falls back" only where a package is missing on this machine
            assert described == "yes: " + kernel.impl.kernel or kernel.install, where
