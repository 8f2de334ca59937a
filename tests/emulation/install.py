"""Install the emulated Ascend packages (``torch_npu`` and sgl-kernel-npu's attention ops) into this
process and take them out again: shared by the ``fake_npu`` fixture and ``make matrix``.

sgl-kernel-npu ships its attention kernels in one of two layouts, and ``layout`` picks which the
fake installs:

* ``"attentions"``: ``import attentions`` registers ``torch.ops.attentions.{la,
  block_sparse_attention, ada_block_sparse_attention, rainfusionattention}``
  (``csrc/attentions/csrc/plugin/register_ops.cpp:21``, ``TORCH_LIBRARY(attentions, m)``).
* ``"sgl_kernel_npu"``: ``import sgl_kernel_npu`` registers ``torch.ops.npu.{laser_attn,
  ada_block_sparse_attention}`` (``python/sgl_kernel_npu/sgl_kernel_npu/attentions/__init__.py``;
  the newest sglang ``laser_attn.py`` calls ``torch.ops.npu.laser_attn`` after ``import
  sgl_kernel_npu``).
* ``"both"``: both packages (whether newer builds still ship ``attentions`` next to
  ``sgl_kernel_npu`` is not known; this covers the case).

The package a layout lacks cannot be imported inside the block, even if a real one is installed.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator

import torch

from tests.emulation import fake_attentions_ops
from tests.emulation.fake_torch_npu import make_fake_torch_npu, recorded

LAYOUTS = ("attentions", "sgl_kernel_npu", "both")
#: Per layout: the module ``import`` finds -> (``torch.ops`` namespace, op names it holds).
_PACKAGES = {
    "attentions": ("attentions", fake_attentions_ops.ATTENTIONS_OPS),
    "sgl_kernel_npu": ("npu", fake_attentions_ops.NPU_OPS),
}
_MISSING = object()


def fake_ops_namespace(namespace: str, names: tuple[str, ...], calls: list) -> types.SimpleNamespace:
    """A ``torch.ops.<namespace>`` stand-in holding the named fake ops, each call recorded in
    ``calls`` as a ``Call`` whose ``.namespace`` is ``namespace``."""
    return types.SimpleNamespace(
        **{name: recorded(name, getattr(fake_attentions_ops, name), calls, namespace) for name in names}
    )


def _package(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"Fake {name} (CPU emulation for attnbridge tests)")
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return module


@contextlib.contextmanager
def installed_fake_npu(layout: str = "attentions", *, strict_docs: bool = True) -> Iterator[types.ModuleType]:
    """The fake ``torch_npu`` in ``sys.modules`` and sgl-kernel-npu's ops in ``layout`` (one of
    :data:`LAYOUTS`) for the block, everything restored after. Yields the fake ``torch_npu``, whose
    ``calls`` records the ops of all of them, ``layout`` names the layout and ``strict_docs`` turns
    the documented FIA limits on or off."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    packages = ["attentions", "sgl_kernel_npu"] if layout == "both" else [layout]
    fake = make_fake_torch_npu(strict_docs=strict_docs)
    fake.layout = layout
    module_names = ("torch_npu", *_PACKAGES)
    namespaces = tuple(namespace for namespace, _ in _PACKAGES.values())
    saved_modules = {name: sys.modules.get(name, _MISSING) for name in module_names}
    saved_ops = {name: vars(torch.ops).get(name, _MISSING) for name in namespaces}
    for name in module_names:
        sys.modules[name] = None  # a real package of the other layout must not be found either
    for name in namespaces:
        vars(torch.ops).pop(name, None)
    sys.modules["torch_npu"] = fake
    for package in packages:
        namespace, names = _PACKAGES[package]
        sys.modules[package] = _package(package)
        setattr(torch.ops, namespace, fake_ops_namespace(namespace, names, fake.calls))
    try:
        yield fake
    finally:
        for name, module in saved_modules.items():
            if module is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, ops in saved_ops.items():
            if ops is _MISSING:
                vars(torch.ops).pop(name, None)
            else:
                setattr(torch.ops, name, ops)
