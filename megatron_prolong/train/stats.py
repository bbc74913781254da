"""One training step's statistics over the global batch: per-domain counts and loss sums, and the
step's model FLOPs, summed over all ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_prolong.parallel.distributed import Topology
from megatron_prolong.train.step import LossStats


@dataclass
class StepStats:
    """The same on every rank after :func:`reduce_step_stats`."""

    domains: torch.Tensor  # [domains, 4] float64: samples, tokens, loss_sum, loss_tokens
    flops: float  # model FLOPs of the step (attention counted for document-masked pairs)
    loss_sum: float
    loss_tokens: float


def reduce_step_stats(outputs: list[dict], local_flops: float, topo: Topology, num_domains: int,
                      seq_length: int, device: torch.device) -> StepStats:
    """Sum the loss statistics of this rank's micro-batches (``outputs`` of Megatron's schedule) and
    its share of the FLOPs over all ranks. Only the last pipeline stage's TP rank 0 holds losses; CP
    ranks share samples, so samples and tokens are counted on CP rank 0 only."""
    # One buffer, one all-reduce: the per-domain table and, after it, the FLOPs.
    buf = torch.zeros(num_domains * 4 + 1, dtype=torch.float64, device=device)
    domains = buf[:-1].view(num_domains, 4)
    if topo.is_last_stage and topo.tp_rank == 0:
        for out in outputs:
            stats: LossStats = out["stats"]
            d = stats.domain.to(device)
            if topo.cp_rank == 0:
                domains[:, 0].index_add_(0, d, torch.ones_like(d, dtype=torch.float64))
                domains[:, 1].index_add_(0, d, torch.full_like(d, seq_length, dtype=torch.float64))
            domains[:, 2].index_add_(0, d, stats.loss_sum.double())
            domains[:, 3].index_add_(0, d, stats.tokens.double())
    buf[-1] = float(local_flops)
    dist.all_reduce(buf)
    loss_sum, loss_tokens = domains[:, 2:].sum(dim=0).tolist()
    return StepStats(domains, buf[-1].item(), loss_sum, loss_tokens)
