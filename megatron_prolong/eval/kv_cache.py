"""Key/value cache for greedy decoding inside the plugin's core attention.

The prefill is the training forward (document-masked, TP and CP, RoPE from the layout), one prompt
at a time; each :class:`~megatron_prolong.model.core_attention.DocumentCoreAttention` stores this
rank's K (after RoPE) and V of that prompt into its row of the cache. Under context parallelism a
rank keeps only its own zigzag shard, never the gathered sequence, so a 512K cache is divided by
CP as well as by TP. A decode step then feeds one token per row, all rows together, through the
same model: every CP rank computes the new queries, attends to its own shard (partial output and
log-sum-exp), and the ranks merge the partials by log-sum-exp with one small all-gather
([batch x heads x (head_dim + 1)] floats). The new token's K/V are written on one rank,
round-robin, so the shards stay balanced.

The buffers have a fixed capacity and the write position is a device tensor, so a decode step
launches the same kernels on the same addresses every time and can be replayed from a CUDA graph
(:mod:`megatron_prolong.eval.decode_step`); attention (:mod:`megatron_prolong.eval.decode_attention`)
reads every slot and a validity mask hides the empty ones. Cached keys carry that mask per row:
a generated token sees only its own (the prompt's last) document, never padding, other rows or
earlier documents of a packed prompt, exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_prolong.eval.decode_attention import torch_attend, triton_attend
from megatron_prolong.model.cross_entropy import triton_available
from megatron_prolong.model.packed import DocumentPackedSeqParams

#: slots are allocated in blocks of this many, so prompts of nearby lengths share one cache (and one
#: captured decode graph)
BLOCK = 256


class _LayerCache:
    """One layer's shard of every row: K and V as [b, hkv, capacity, d]."""

    def __init__(self, batch: int, capacity: int, like: torch.Tensor) -> None:
        _, _, hkv, d = like.shape
        self.k = like.new_zeros(batch, hkv, capacity, d)
        self.v = like.new_zeros(batch, hkv, capacity, d)

    def store(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One prompt's K/V, [s, 1, hkv, d], into slots [0, s) of ``row``."""
        s = k.shape[0]
        self.k[row, :, :s] = k[:, 0].transpose(0, 1)
        self.v[row, :, :s] = v[:, 0].transpose(0, 1)

    def write(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Every row's new K/V, [1, b, hkv, d], each at its own slot, held by the device tensor ``slot`` [b]."""
        b, hkv, _, d = self.k.shape
        where = slot.view(b, 1, 1, 1).expand(b, hkv, 1, d)
        self.k.scatter_(2, where, k[0][:, :, None])
        self.v.scatter_(2, where, v[0][:, :, None])

    def attend(self, q: torch.Tensor, valid: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q [b, hq, d] against every slot: (output [b, hq, d] fp32, lse [b, hq] fp32)."""
        attend = triton_attend if q.is_cuda and triton_available() else torch_attend
        return attend(q, self.k, self.v, valid, scale)


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


def capacity_for(prefill_local: int, max_new_tokens: int, cp_size: int) -> int:
    """Slots one rank needs: its longest prefill shard and its round-robin share of the new tokens,
    rounded up to whole blocks."""
    need = prefill_local + -(-max_new_tokens // cp_size)
    return -(-need // BLOCK) * BLOCK


class KVCache:
    """All layers' shards for ``batch`` rows on this rank, ``capacity`` slots each.

    The layer buffers are made at the first prefill (their head count, head size and dtype come
    from the model) and reused for every later batch of the same shape, so a captured decode graph
    stays valid. Use: :meth:`begin_row` + the model's forward for each prompt, then
    :meth:`start_decoding`, then decode steps (:meth:`begin_step`, the model's forward, which calls
    :meth:`decode` in every layer, and :meth:`end_step`).
    """

    def __init__(self, batch: int, capacity: int, device: torch.device, cp_group=None) -> None:
        if capacity % BLOCK:
            raise ValueError(f"KV cache capacity {capacity} must be a multiple of {BLOCK}")
        self.batch, self.capacity = batch, capacity
        self.cp_group = cp_group if cp_group is not None and dist.get_world_size(cp_group) > 1 else None
        self.cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        self.cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        self.layers: dict[int, _LayerCache] = {}
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        # each row's next write position on this rank: right after its own prompt, so a row's keys sit
        # in the same slots (and the attention sums them in the same order) whatever shares its batch
        self.slot = torch.zeros(batch, dtype=torch.long, device=device)
        self.row = 0
        self.decoding = False
        self.steps = 0

    def begin_row(self, row: int, valid: torch.Tensor) -> None:
        """Prefill of ``row`` next; ``valid`` [s_local] says which of this rank's prompt tokens the
        generated tokens may attend to (the last document, no padding)."""
        if valid.shape[0] > self.capacity:
            raise ValueError(f"a prompt shard of {valid.shape[0]} tokens exceeds the cache's {self.capacity} slots")
        self.row, self.decoding = row, False
        self.valid[row].zero_()
        self.valid[row, : valid.shape[0]] = valid.to(self.valid.device)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill: this rank's K (after RoPE) and V of the current row's prompt, [s_local, 1, hkv, d]."""
        cache = self.layers.get(layer)
        if cache is None:
            cache = self.layers[layer] = _LayerCache(self.batch, self.capacity, k)
        cache.store(self.row, k, v)

    def start_decoding(self, first_slots: list[int]) -> None:
        """Decode row ``i`` from slot ``first_slots[i]`` on (right after its prefill shard on this rank)."""
        if len(first_slots) != self.batch:
            raise ValueError(f"{len(first_slots)} first slots for a cache of {self.batch} rows")
        self.decoding, self.steps = True, 0
        for row, first in enumerate(first_slots):
            self.valid[row, first:] = False
        self.slot.copy_(torch.tensor(first_slots, dtype=torch.long))

    def _writes(self) -> bool:
        return self.steps % self.cp_size == self.cp_rank

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """One new token per row: q [1, b, hq, d], k/v [1, b, hkv, d] (after RoPE) -> [1, b, hq * d]."""
        cache = self.layers[layer]
        if self._writes():
            cache.write(self.slot, k, v)
        out, lse = cache.attend(q[0], self.valid, scale)
        out = merge_partials(out, lse, self.cp_group)
        return out.to(q.dtype).reshape(1, q.shape[1], -1)

    def begin_step(self) -> None:
        """Before a decode step: the slot the new tokens go to becomes visible (on the rank writing it)."""
        if self._writes():
            self.valid.scatter_(1, self.slot[:, None], True)

    def end_step(self) -> None:
        """After a decode step: the next slot on the rank that wrote this one."""
        if self._writes():
            self.slot.add_(1)
        self.steps += 1

    def memory_bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers.values())


@dataclass
class CachedPackedSeqParams(DocumentPackedSeqParams):
    """The micro-batch parameters plus the cache; ``kv_cache.decoding`` selects prefill or decode."""

    kv_cache: KVCache | None = field(default=None, repr=False)
