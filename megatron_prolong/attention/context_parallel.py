"""The K/V all-gather of context parallelism, and the row-level zigzag helpers.

Attention with CP all-gathers K and V over the group (each rank's share, then reordered to the
natural order by the :class:`~.split.CPSplit` the shares follow), each rank computing its own
queries against the whole gathered sequence with global positions. The backward reduce-scatters
dK/dV back to the ranks that own the tokens.

Zigzag (chunks ``r`` and ``2C-1-r`` of ``2C`` equal chunks of the row, for rank ``r``) is the
split of the evaluation scorer and of the tests' sharding helpers below.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _check(seq_len: int, cp_size: int, cp_rank: int | None = None) -> int:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 x context_parallel_size = "
            f"{2 * cp_size}; pad or choose another CP size"
        )
    if cp_rank is not None and not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp_size {cp_size}")
    return seq_len // (2 * cp_size)


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions (int64) held by ``cp_rank``: chunk r then chunk 2C-1-r of 2C chunks."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    n = _check(seq_len, cp_size, cp_rank)
    a = torch.arange(cp_rank * n, (cp_rank + 1) * n, device=device)
    b = torch.arange((2 * cp_size - 1 - cp_rank) * n, (2 * cp_size - cp_rank) * n, device=device)
    return torch.cat([a, b])


def shard_zigzag(x: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This rank's share of ``x`` along ``dim`` (a copy unless ``cp_size == 1``)."""
    if cp_size == 1:
        return x
    n = _check(x.shape[dim], cp_size, cp_rank)
    return torch.cat(
        [x.narrow(dim, cp_rank * n, n), x.narrow(dim, (2 * cp_size - 1 - cp_rank) * n, n)], dim=dim
    )


def unshard_zigzag(x: torch.Tensor, dim: int, cp_size: int) -> torch.Tensor:
    """Inverse of sharding: ``x`` is the rank-major concatenation of every rank's share
    (what an all-gather returns); the result is in natural sequence order."""
    if cp_size == 1:
        return x
    n = _check(x.shape[dim], cp_size)
    chunks = []
    for c in range(2 * cp_size):
        if c < cp_size:  # first chunk of rank c
            chunks.append(x.narrow(dim, (2 * c) * n, n))
        else:  # second chunk of rank 2C-1-c
            chunks.append(x.narrow(dim, (2 * (2 * cp_size - 1 - c) + 1) * n, n))
    return torch.cat(chunks, dim=dim)


def reshard_zigzag(x: torch.Tensor, dim: int, cp_size: int) -> torch.Tensor:
    """Natural order -> rank-major concatenation of shares (inverse of :func:`unshard_zigzag`)."""
    if cp_size == 1:
        return x
    return torch.cat([shard_zigzag(x, dim, cp_size, r) for r in range(cp_size)], dim=dim)


# ---------------------------------------------------------------------- collectives
def _is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if _is_gloo(group):
        dist.all_gather(list(out.chunk(world, dim=0)), x, group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    x = x.contiguous()
    n = x.shape[0] // world
    if _is_gloo(group):
        # gloo has no reduce_scatter: all-reduce, then keep this rank's slice.
        dist.all_reduce(x, group=group)
        return x.narrow(0, rank * n, n).clone()
    out = torch.empty((n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


class _GatherSplit(torch.autograd.Function):
    """All-gather along dim 0 of every rank's share -> natural order; backward: back to the
    rank-major order, then reduce-scatter (each token's gradient summed over the ranks that
    read it, sent to its owner)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, split) -> torch.Tensor:
        ctx.group, ctx.split = group, split
        return _reorder(_all_gather_dim0(x, group), split.natural(x.device), split.uniform)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = _reorder(grad, ctx.split.rank_major(grad.device), ctx.split.uniform)
        return _reduce_scatter_dim0(g, ctx.group), None, None


def _reorder(x: torch.Tensor, index: torch.Tensor, uniform: bool) -> torch.Tensor:
    """``out[i, row] = x[index[row, i], row]`` along dim 0 of ``[s, b, ...]``."""
    if uniform:
        return x.index_select(0, index[0])
    return torch.stack([x[:, row].index_select(0, index[row]) for row in range(x.shape[1])], dim=1)


def gather_kv(k: torch.Tensor, v: torch.Tensor, group, split) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the whole sequence, natural order, from every rank's share (one all-gather:
    they are concatenated on the last dim). ``split``: the :class:`~.split.CPSplit` the shares
    follow. Differentiable: dK/dV are reduce-scattered back to the owners (all-reduce + slice
    on gloo, which has no reduce-scatter)."""
    if group is None or dist.get_world_size(group) == 1:
        return k, v
    d = k.shape[-1]
    kv = _GatherSplit.apply(torch.cat([k, v], dim=-1), group, split)
    return kv[..., :d], kv[..., d:]
