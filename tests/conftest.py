"""Shared fixtures: a fake ``torch_npu`` (and sgl-kernel-npu ``attentions`` ops) so the Ascend code
paths run on CPU, per-test seeding, and a fresh attnbridge layer cache per test."""

from __future__ import annotations

import sys
import zlib

import pytest
import torch

from tests.emulation.fixtures import fake_npu_layout  # noqa: F401 (fixture: once per sgl-kernel-npu layout)
from tests.emulation.install import installed_fake_npu


@pytest.fixture
def fake_npu(request):
    """Install the emulated ``torch_npu`` and sgl-kernel-npu ops for one test (layout "attentions"
    unless ``@pytest.mark.parametrize("fake_npu", [...], indirect=True)`` says otherwise); yields the
    fake module, whose ``calls`` records every op call (``call.namespace`` says where it lives)."""
    with installed_fake_npu(getattr(request, "param", "attentions")) as fake:
        yield fake


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seed torch from the test's id: every test is reproducible, and tests differ from each other."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True)
def _fresh_shared_layers():
    """``attend`` caches resolved layers; a layer resolved while a fake package was installed must
    not leak into the next test (nor the reverse)."""
    from attnbridge.attention.api import _shared_layer

    _shared_layer.cache_clear()
    yield
    _shared_layer.cache_clear()


def pytest_addoption(parser):
    parser.addoption(
        "--matrix-summary",
        action="store_true",
        help="print the backend x model x platform grid (make matrix)",
    )


def pytest_terminal_summary(terminalreporter, config):
    """``make matrix``: the verdict of every model cell, one table per platform."""
    matrix = sys.modules.get("tests.test_matrix")
    if not config.getoption("--matrix-summary") or matrix is None:
        return
    families = [f.name for f in matrix.TABLE.families]
    write = terminalreporter.write_line
    for platform in matrix.TABLE.platforms:
        write(f"\n== {platform} ({matrix.platform_mode(platform)}) ==")
        write(f"{'backend':<14}" + "".join(f"{f:<16}" for f in families))
        for backend in matrix.TABLE.backends:
            cells = [matrix.VERDICTS.get((backend, f, platform), "-") for f in families]
            write(f"{backend:<14}" + "".join(f"{c:<16}" for c in cells))
    write(
        "\nok <rel-L2>: the patched tiny model matches its reference; refused: the table's error was raised"
    )
