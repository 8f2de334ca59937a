"""Shared fixtures: a fake ``torch_npu`` (and sgl-kernel-npu ``attentions`` ops) so the Ascend code
paths run on CPU, per-test seeding, and a fresh attnbridge layer cache per test."""

from __future__ import annotations

import importlib
import inspect
import sys
import types
import zlib

import pytest
import torch

from tests.emulation.fake_torch_npu import make_fake_torch_npu

ATTENTIONS_OPS_MODULE = "tests.emulation.fake_attentions_ops"


def _fake_attentions_namespace(calls: list) -> types.SimpleNamespace:
    """``torch.ops.attentions`` stand-in: the public functions of the attentions-ops emulation
    (when that module exists), each call recorded in ``calls`` as ``(name, args, kwargs)``."""
    try:
        module = importlib.import_module(ATTENTIONS_OPS_MODULE)
    except ModuleNotFoundError as error:
        if error.name != ATTENTIONS_OPS_MODULE:
            raise
        return types.SimpleNamespace()

    def recorded(name, fn):
        def op(*args, **kwargs):
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)

        op.__name__ = op.__qualname__ = name
        op.__doc__ = fn.__doc__
        return op

    functions = {
        name: recorded(name, fn)
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if not name.startswith("_") and fn.__module__ == module.__name__
    }
    return types.SimpleNamespace(**functions)


@pytest.fixture
def fake_npu(monkeypatch):
    """Install the emulated ``torch_npu`` (and an ``attentions`` package whose ops live on
    ``torch.ops.attentions``) for one test; yields the fake module, whose ``calls`` list records
    every op call of both."""
    fake = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setitem(sys.modules, "attentions", types.ModuleType("attentions"))
    monkeypatch.setattr(torch.ops, "attentions", _fake_attentions_namespace(fake.calls), raising=False)
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
