"""Document-masked causal attention with context parallelism (pure PyTorch).

Imports only torch; usable without megatron-core (the GPU benchmark machine has none).
"""

from .config import AttentionConfig
from .context_parallel import gather_kv, reshard_zigzag, shard_zigzag, unshard_zigzag, zigzag_indices
from .dispatch import (
    AUTO_RULES,
    BACKENDS,
    attend_gathered,
    decode_attention,
    document_attention,
    resolve_backend,
)
from .layout import DocumentLayout
from .split import (
    CPSplit, balance, balanced_split, pieces, rank_work, split_for, spread_split, zigzag_split,
)

__all__ = [
    "AUTO_RULES", "BACKENDS", "AttentionConfig", "CPSplit", "DocumentLayout", "attend_gathered",
    "balance", "balanced_split", "decode_attention", "document_attention", "gather_kv",
    "pieces", "rank_work", "reshard_zigzag", "resolve_backend", "shard_zigzag", "split_for",
    "spread_split", "unshard_zigzag",
    "zigzag_indices", "zigzag_split",
]
