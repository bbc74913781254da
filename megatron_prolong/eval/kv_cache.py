"""Key/value cache for greedy decoding inside the plugin's core attention.

The prefill is the training forward (document-masked, TP and CP, RoPE from the layout). Each
:class:`~megatron_prolong.model.core_attention.DocumentCoreAttention` then stores this rank's K
(after RoPE) and V; under context parallelism a rank keeps only its own zigzag shard, never the
gathered sequence, so a 512K cache is divided by CP as well as by TP. A decode step feeds one
token per row through the same model: every CP rank computes the new query, attends to its own
shard (partial output and log-sum-exp), and the ranks merge the partials by log-sum-exp with one
small all-gather ([batch x heads x (head_dim + 1)] floats). The new token's K/V are appended on
one rank, round-robin, so the shards stay balanced.

Cached keys carry a validity mask: a generated token sees only its own (the prompt's last)
document, never padding or earlier documents of a packed prompt, exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_prolong.model.packed import DocumentPackedSeqParams


class _LayerCache:
    """One layer's shard: K and V as [b, hkv, capacity, d], ``length`` slots filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, extra: int) -> None:
        s, b, hkv, d = k.shape
        self.k = k.new_empty(b, hkv, s + extra, d)
        self.v = v.new_empty(b, hkv, s + extra, d)
        self.k[:, :, :s] = k.permute(1, 2, 0, 3)
        self.v[:, :, :s] = v.permute(1, 2, 0, 3)
        self.valid = torch.zeros(b, s + extra, dtype=torch.bool, device=k.device)
        self.valid[:, :s] = valid.t()
        self.length = s

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [1, b, hkv, d]."""
        if self.length == self.k.shape[2]:
            raise RuntimeError("KV cache is full: more decode steps than it was sized for")
        self.k[:, :, self.length] = k[0]
        self.v[:, :, self.length] = v[0]
        self.valid[:, self.length] = True
        self.length += 1

    def attend(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q [b, hq, d] against the filled slots: (output [b, hq, d] float32, lse [b, hq] float32)."""
        b, hq, d = q.shape
        hkv = self.k.shape[1]
        n = self.length
        qg = (q * scale).reshape(b, hkv, hq // hkv, d)
        scores = torch.matmul(qg, self.k[:, :, :n].transpose(-1, -2)).float()  # [b, hkv, g, n]
        scores = scores.masked_fill(~self.valid[:, None, None, :n], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # -inf where this shard holds no visible key
        p = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
        out = torch.matmul(p.to(self.v.dtype), self.v[:, :, :n]).float()
        return out.reshape(b, hq, d), lse.reshape(b, hq)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """Exact softmax attention from per-rank partials: sum_r exp(lse_r - lse) out_r, over ``group``."""
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return out
    packed = torch.cat([out, lse[..., None]], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    stacked = torch.stack(parts)  # [world, b, hq, d + 1]
    outs, lses = stacked[..., :-1], stacked[..., -1]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).nan_to_num(nan=0.0)
    return (weights[..., None] * outs.nan_to_num(nan=0.0)).sum(dim=0)


class KVCache:
    """All layers' shards for one batch of prompts on this rank.

    ``valid``: [s_local, b] bool, which prefill tokens (this rank's, in its zigzag order) decoded
    tokens may attend to. ``max_new_tokens`` sizes the buffers.
    """

    def __init__(self, valid: torch.Tensor, max_new_tokens: int, cp_group=None) -> None:
        self.valid = valid
        self.cp_group = cp_group if cp_group is not None and dist.get_world_size(cp_group) > 1 else None
        cp = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        self.cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        self.cp_size = cp
        self.extra = -(-max_new_tokens // cp)
        self.layers: dict[int, _LayerCache] = {}
        self.decoding = False
        self.steps = 0

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill: this rank's K (after RoPE) and V, [s_local, b, hkv, d]."""
        self.layers[layer] = _LayerCache(k, v, self.valid.to(k.device), self.extra)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """One new token per row: q [1, b, hq, d], k/v [1, b, hkv, d] (after RoPE) -> [1, b, hq * d]."""
        cache = self.layers[layer]
        if self.steps % self.cp_size == self.cp_rank:
            cache.append(k, v)
        out, lse = cache.attend(q[0], scale)
        out = merge_partials(out, lse, self.cp_group)
        return out.to(q.dtype).reshape(1, q.shape[1], -1)

    def memory_bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers.values())


@dataclass
class CachedPackedSeqParams(DocumentPackedSeqParams):
    """The micro-batch parameters plus the cache; ``kv_cache.decoding`` selects prefill or decode."""

    kv_cache: KVCache | None = field(default=None, repr=False)
