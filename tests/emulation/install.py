"""Install the emulated Ascend packages (``torch_npu`` and sgl-kernel-npu's ``attentions`` ops) into
this process and take them out again: shared by the ``fake_npu`` fixture and ``make matrix``."""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Iterator

import torch

from tests.emulation import fake_attentions_ops
from tests.emulation.fake_torch_npu import make_fake_torch_npu

_MISSING = object()


def fake_attentions_namespace(calls: list) -> types.SimpleNamespace:
    """``torch.ops.attentions`` stand-in: every public op of the emulation, each call recorded in
    ``calls`` as ``(name, args, kwargs)``."""

    def recorded(name, fn):
        def op(*args, **kwargs):
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)

        op.__name__ = op.__qualname__ = name
        op.__doc__ = fn.__doc__
        return op

    return types.SimpleNamespace(
        **{
            name: recorded(name, fn)
            for name, fn in inspect.getmembers(fake_attentions_ops, inspect.isfunction)
            if not name.startswith("_") and fn.__module__ == fake_attentions_ops.__name__
        }
    )


@contextlib.contextmanager
def installed_fake_npu() -> Iterator[types.ModuleType]:
    """The fake ``torch_npu`` in ``sys.modules`` and its ``attentions`` ops on ``torch.ops`` for the
    block, restored after; yields the fake, whose ``calls`` records the ops of both."""
    fake = make_fake_torch_npu()
    saved_modules = {name: sys.modules.get(name, _MISSING) for name in ("torch_npu", "attentions")}
    saved_ops = vars(torch.ops).get("attentions", _MISSING)
    sys.modules["torch_npu"] = fake
    sys.modules["attentions"] = types.ModuleType("attentions")
    torch.ops.attentions = fake_attentions_namespace(fake.calls)
    try:
        yield fake
    finally:
        for name, module in saved_modules.items():
            if module is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        if saved_ops is _MISSING:
            delattr(torch.ops, "attentions")
        else:
            torch.ops.attentions = saved_ops
