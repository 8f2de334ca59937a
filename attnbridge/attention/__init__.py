"""The backend layer: contract, declarations, and the single ``attend`` call."""

from attnbridge.attention.api import AttentionLayer, attend, observe
from attnbridge.attention.contract import AttentionContext, AttentionImpl
from attnbridge.attention.registry import Backend, Unavailable, backend_names, backends, get_backend

__all__ = [
    "AttentionContext",
    "AttentionImpl",
    "AttentionLayer",
    "Backend",
    "Unavailable",
    "attend",
    "backend_names",
    "backends",
    "get_backend",
    "observe",
]
