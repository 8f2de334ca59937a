"""Ascend NPU packages (torch_npu, sgl-kernel-npu), imported only here so that a missing one is an
error naming what to install. sgl-kernel-npu registers its kernels under ``torch.ops.npu`` (newer
``sgl_kernel_npu`` builds) or ``torch.ops.attentions`` (older ``attentions`` builds)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from attnbridge.errors import BackendUnavailableError

TORCH_NPU_INSTALL = "pip install torch-npu (matching your torch and CANN versions)"
SGL_KERNEL_NPU_INSTALL = "pip install sgl-kernel-npu"

#: (package to import, torch.ops namespace it registers), newest layout first.
KERNEL_LAYOUTS: tuple[tuple[str, str], ...] = (("sgl_kernel_npu", "npu"), ("attentions", "attentions"))

#: ``torch_npu.npu.get_soc_version()`` of Ascend 950 (A5): no Laser, block-sparse wants ``inner_precise=4``.
ASCEND_A5_SOC = 260


def load_torch_npu(backend: str = "npu") -> ModuleType:
    """Import torch_npu or raise an error that says how to install it."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as error:
        raise BackendUnavailableError(
            backend, "npu", f"torch_npu cannot be imported ({error})", TORCH_NPU_INSTALL
        ) from error


@dataclass(frozen=True)
class KernelOp:
    """An sgl-kernel-npu op and where it was found (``torch.ops.npu.laser_attn``)."""

    fn: Callable
    qualified_name: str
    package: str

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def load_kernel_op(backend: str, names: dict[str, tuple[str, ...]]) -> KernelOp:
    """The first op found of ``names`` (namespace -> op names, preferred first), newest layout first."""
    load_torch_npu(backend)
    tried = []
    for package, namespace in KERNEL_LAYOUTS:
        wanted = names.get(namespace, ())
        if not wanted:
            continue
        try:
            importlib.import_module(package)
        except ImportError as error:
            tried.append(f"import {package} ({error})")
            continue
        ops = getattr(torch.ops, namespace)
        for name in wanted:
            try:
                return KernelOp(getattr(ops, name), f"torch.ops.{namespace}.{name}", package)
            except (AttributeError, RuntimeError):
                tried.append(f"torch.ops.{namespace}.{name}")
    raise BackendUnavailableError(
        backend, "npu", f"no sgl-kernel-npu kernel found (tried {'; '.join(tried)})", SGL_KERNEL_NPU_INSTALL
    )


def is_ascend_a5(torch_npu: ModuleType) -> bool:
    """Whether the NPU in use is an Ascend 950 (A5); False where that cannot be queried (the call decides)."""
    try:
        return torch_npu.npu.get_soc_version() == ASCEND_A5_SOC
    except Exception:  # noqa: BLE001 - any failure of the query means "unknown", not an error
        return False
