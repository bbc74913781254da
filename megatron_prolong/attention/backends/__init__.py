"""Attention backends behind one interface: a plan from the layout and this rank's share of the
queries (built once per micro-batch and reused by every layer), then runs with it.

Every backend computes this rank's queries (``[s_local, b, hq, d]``, the rank's tokens in local
order) against the whole, natural-order K/V (``[s, b, hkv, d]``) as the pieces of
:func:`~megatron_prolong.attention.split.pieces` say, and returns ``[s_local, b, hq, d]``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..config import AttentionConfig
from ..layout import DocumentLayout
from ..split import CPSplit


class Backend(Protocol):
    name: str

    def plan_key(self, cfg: AttentionConfig) -> tuple:
        """The config values the plan depends on (part of its cache key)."""

    def plan(self, layout: DocumentLayout, split: CPSplit, rank: int, cfg: AttentionConfig) -> Any:
        """Everything the kernel needs that depends only on the layout and the rank's share
        (built on the layout's device)."""

    def run(self, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            scale: float) -> torch.Tensor: ...


def cached_plan(backend: Backend, layout: DocumentLayout, split: CPSplit, rank: int,
                cfg: AttentionConfig) -> Any:
    key = (type(backend), split, rank, backend.plan_key(cfg))
    if key not in layout._cache:
        layout._cache[key] = backend.plan(layout, split, rank, cfg)
    return layout._cache[key]
