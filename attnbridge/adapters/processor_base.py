"""The base of attnbridge's diffusers attention processors."""

from __future__ import annotations

from attnbridge.adapters.forward_state import ForwardState
from attnbridge.adapters.sequence_shards import ShardState
from attnbridge.attention.api import AttentionLayer


class BridgeProcessor:
    """One attention module's processor. ``layer_name`` is only for error messages: a per-layer string
    in the traced path would make ``torch.compile`` compile once per layer."""

    # diffusers' set_attention_backend / enable_parallelism write these; we honour neither.
    _attention_backend = None
    _parallel_config = None

    def __init__(
        self,
        layer: AttentionLayer,
        *,
        layer_name: str,
        kind: str,
        state: ForwardState,
        shards: ShardState | None = None,
    ) -> None:
        self.layer = layer
        self.layer_name = layer_name
        self.kind = kind
        self.state = state
        self.shards = shards

    def refuse_diffusers_parallelism(self) -> None:
        if self._parallel_config is not None:
            raise NotImplementedError(
                f"{self.layer_name}: diffusers context parallelism is not supported with attnbridge "
                "processors; disable_npu_attention first or use attnbridge's own parallel attention"
            )
