"""Shared fixtures: a fake ``torch_npu`` (and sgl-kernel-npu ``attentions`` ops) so the Ascend code
paths run on CPU, per-test seeding, and a fresh attnbridge layer cache per test."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.emulation.install import installed_fake_npu


@pytest.fixture
def fake_npu():
    """Install the emulated ``torch_npu`` (and an ``attentions`` package whose ops live on
    ``torch.ops.attentions``) for one test; yields the fake module, whose ``calls`` list records
    every op call of both."""
    with installed_fake_npu() as fake:
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
    try:
        from attnbridge.attention.api import _shared_layer
    except ImportError:
        yield
        return
    _shared_layer.cache_clear()
    yield
    _shared_layer.cache_clear()
