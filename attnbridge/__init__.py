"""attnbridge: one line to route a diffusers/transformers model's attention through fast backends."""

from attnbridge.attention import AttentionContext, AttentionLayer, attend
from attnbridge.errors import BackendUnavailableError

__version__ = "0.1.0"

__all__ = ["AttentionContext", "AttentionLayer", "BackendUnavailableError", "attend", "__version__"]
