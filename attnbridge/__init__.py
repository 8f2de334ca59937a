"""attnbridge: one line to route a diffusers/transformers model's attention through fast backends."""

from attnbridge.attention import AttentionContext, AttentionLayer, attend
from attnbridge.enable import AttentionHandle, disable_npu_attention, enable_npu_attention
from attnbridge.errors import BackendUnavailableError

__version__ = "0.1.0"

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
