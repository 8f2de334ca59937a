"""The backend layer: contract, registry, and the single ``attend`` call."""

from attnbridge.attention.api import AttentionLayer, attend
from attnbridge.attention.contract import (
    AttentionContext,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from attnbridge.attention.registry import BACKENDS, BackendSpec, backend_names, get_backend_spec

__all__ = [
    "BACKENDS",
    "AttentionContext",
    "AttentionImpl",
    "AttentionLayer",
    "AttentionMetadata",
    "AttentionMetadataBuilder",
    "BackendSpec",
    "attend",
    "backend_names",
    "get_backend_spec",
]
