"""pytest fixtures over ``tests.emulation.install``; a test module (or conftest) that imports one
makes it available."""

from __future__ import annotations

import pytest

from tests.emulation.install import installed_fake_npu

#: The two sgl-kernel-npu layouts a build ships alone.
KERNEL_LAYOUTS = ("attentions", "sgl_kernel_npu")


@pytest.fixture(params=KERNEL_LAYOUTS)
def fake_npu_layout(request):
    """The emulated Ascend packages, once per sgl-kernel-npu layout (``fake.layout`` says which);
    ``@pytest.mark.parametrize("fake_npu_layout", ["both"], indirect=True)`` picks others."""
    with installed_fake_npu(request.param) as fake:
        yield fake
