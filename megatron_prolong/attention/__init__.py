"""Document-masked causal attention with context parallelism (pure PyTorch).

Imports only torch; usable without megatron-core (the GPU benchmark machine has none).
"""

from .context_parallel import (
    gather_kv_zigzag,
    gather_zigzag,
    reshard_zigzag,
    shard_zigzag,
    unshard_zigzag,
    zigzag_indices,
    zigzag_segments,
)
from .core import BACKENDS, attend_gathered, document_attention, flex_block_mask, resolve_backend
from .layout import DocumentLayout

__all__ = [
    "BACKENDS",
    "DocumentLayout",
    "attend_gathered",
    "document_attention",
    "flex_block_mask",
    "gather_kv_zigzag",
    "gather_zigzag",
    "reshard_zigzag",
    "resolve_backend",
    "shard_zigzag",
    "unshard_zigzag",
    "zigzag_indices",
    "zigzag_segments",
]
