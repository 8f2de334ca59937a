"""The ``sage`` backend: SageAttention (int8 QK) on CUDA and MUSA.

Where ``sageattention`` is missing, or the platform has no Sage kernel, the platform table falls back
to ``fa`` with a logged warning, or raises with ``strict=True``.
"""

from __future__ import annotations

import importlib
import inspect

from attnbridge.attention.contract import HALF_DTYPES, AttentionImpl, default_scale
from attnbridge.errors import BackendUnavailableError

SAGE_INSTALL = "pip install sageattention"


def _load_sageattn(platform: str):
    try:
        return importlib.import_module("sageattention").sageattn
    except (ImportError, AttributeError) as error:
        raise BackendUnavailableError(
            "sage", platform, f"sageattention cannot be imported ({error})", SAGE_INSTALL
        ) from error


class SageImpl(AttentionImpl):
    """``sageattention.sageattn`` in NHD (= BSHD) layout; LSE only where the installed version has it."""

    kernel = "sageattention.sageattn (NHD)"
    supported_dtypes = HALF_DTYPES
    supported_head_sizes = (64, 96, 128)

    @classmethod
    def check_available(cls, platform: str) -> None:
        _load_sageattn(platform)

    def __init__(self, backend_name: str = "", **config) -> None:
        super().__init__(backend_name, **config)
        self._sageattn = _load_sageattn("cuda")
        self.supports_lse = "return_lse" in inspect.signature(self._sageattn).parameters

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, metadata=None, context=None):
        groups = q.shape[2] // k.shape[2]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        kwargs = {"tensor_layout": "NHD", "is_causal": causal, "sm_scale": default_scale(q.shape[-1], scale)}
        if return_lse:
            out, lse = self._sageattn(q, k, v, return_lse=True, **kwargs)
            return out, lse.reshape(q.shape[0], q.shape[2], q.shape[1]).float()
        return self._sageattn(q, k, v, **kwargs)


class SageUnsupportedImpl(AttentionImpl):
    """Placeholder for platforms with no Sage kernel: never instantiated, only resolved and refused."""

    kernel = "none"

    @classmethod
    def check_available(cls, platform: str) -> None:
        raise BackendUnavailableError(
            "sage", platform, f"SageAttention has no kernel for {platform}; it needs a CUDA or MUSA GPU"
        )

    def forward(self, q, k, v, **kwargs):  # pragma: no cover - check_available always refuses
        raise BackendUnavailableError("sage", "unknown", "SageAttention has no kernel here")
