"""attnbridge: one line to route a diffusers/transformers model's attention through fast backends."""

import sys as _sys

from attnbridge.attention import AttentionContext, AttentionLayer, attend
from attnbridge.enable import AttentionHandle, disable_npu_attention, enable_npu_attention
from attnbridge.errors import BackendUnavailableError

__version__ = "0.1.0"

if "transformers" in _sys.modules:
    # A patched model loaded from a file names its attn implementation "attnbridge_<backend>".
    from attnbridge.adapters.transformers import register_all as _register_all

    _register_all()

__all__ = [
    "AttentionContext",
    "AttentionHandle",
    "AttentionLayer",
    "BackendUnavailableError",
    "__version__",
    "attend",
    "disable_npu_attention",
    "enable_npu_attention",
]
