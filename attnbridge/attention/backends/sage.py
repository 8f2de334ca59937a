"""The ``sage`` backend: SageAttention (int8 QK) on CUDA and MUSA.

Where ``sageattention`` is missing, or the platform has no Sage kernel, ``fa`` serves with a logged
warning (or an error with ``strict=True``). Calls the installed ``sageattn`` cannot take run ``fa``
too, with the reason logged once: head sizes other than 64/96/128 and causal attention with
``S_q != S_kv``; key padding runs ``fa`` too, said when a model that can be padded is patched. An LSE request (ring attention) is refused: ``sageattn`` returns
no LSE, and serving it from ``fa`` would make ``sage`` silently dense there. Its K
smoothing (subtracting the keys' mean, which leaves the softmax unchanged) is done here out of
place: ``sageattn`` does it in place on the caller's keys.
"""

from __future__ import annotations

import importlib

from attnbridge.attention.contract import HALF_DTYPES, default_scale, repeat_kv_heads
from attnbridge.attention.registry import Backend, DenseFallbackImpl, Unavailable
from attnbridge.errors import BackendUnavailableError
from attnbridge.notices import warn_once

SAGE_INSTALL = "pip install sageattention"
SAGE_HEAD_SIZES = (64, 96, 128)


def _load_sageattn(platform: str):
    try:
        return importlib.import_module("sageattention").sageattn
    except (ImportError, AttributeError) as error:
        raise BackendUnavailableError(
            "sage", platform, f"sageattention cannot be imported ({error})", SAGE_INSTALL
        ) from error


class SageImpl(DenseFallbackImpl):
    """``sageattention.sageattn`` in NHD (= BSHD) layout; other calls run dense ``fa``."""

    description = "sageattention.sageattn (int8 QK, NHD)"
    supported_dtypes = HALF_DTYPES
    supports_lse = False
    padding_fallback = "sageattn takes no key padding"
    install = (SAGE_INSTALL,)
    notes = (
        "calls sageattn cannot take (head size not 64/96/128, causal with S_q != S_kv) run dense "
        "`fa`, logged once; on an H200 (Hopper) sageattention 1.0.6's Triton kernels "
        "were slower than `fa`: a Wan 1.3B 480p step took 710.2 ms against 603.3 ms"
    )

    @classmethod
    def check_available(cls, platform: str) -> None:
        _load_sageattn(platform)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sageattn = _load_sageattn(self.platform)

    def _refusal(self, q, k, causal) -> str | None:
        """Why ``sageattn`` cannot take this call, or None."""
        if q.shape[-1] not in SAGE_HEAD_SIZES:
            return f"head size {q.shape[-1]} (sageattn takes {SAGE_HEAD_SIZES})"
        if causal and q.shape[1] != k.shape[1]:
            return "causal attention with S_q != S_kv"
        return None

    def forward(self, q, k, v, *, causal=False, scale=None, return_lse=False, context=None):
        refusal = self._refusal(q, k, causal)
        padded = context is not None and context.key_lengths is not None  # said when enabled
        if refusal is not None or padded:
            if refusal is not None:
                warn_once(f"backend 'sage': {refusal} runs dense 'fa'")
            return self.dense(q, k, v, causal=causal, scale=scale, return_lse=return_lse, context=context)
        k, v = repeat_kv_heads(q, k, v)
        k = k - k.mean(dim=1, keepdim=True, dtype=k.dtype)
        kwargs = {
            "tensor_layout": "NHD",
            "is_causal": causal,
            "sm_scale": default_scale(q.shape[-1], scale),
            "smooth_k": False,
        }
        return self._sageattn(q.contiguous(), k.contiguous(), v.contiguous(), **kwargs)


_NO_SAGE = Unavailable("SageAttention needs a CUDA or MUSA GPU")

BACKEND = Backend(
    "sage",
    "SageAttention int8 QK (CUDA/MUSA); falls back to fa unless strict",
    platforms={"cpu": _NO_SAGE, "cuda": SageImpl, "musa": SageImpl, "npu": _NO_SAGE},
    fallback="fa",
    order=2,
)
