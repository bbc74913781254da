"""Process groups: NCCL on GPU, gloo on CPU, Megatron's model-parallel groups on top."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_prolong.config import ParallelConfig
from megatron_prolong.parallel.lifetime import launched_by_launcher, watch_launcher


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    dp_size: int
    cp_size: int
    is_last_stage: bool

    @property
    def is_logger(self) -> bool:
        """The rank that writes console lines, metrics and TensorBoard events."""
        return self.rank == 0


def _env(torchrun: str, slurm: str, default: str) -> str:
    """torchrun's variables, else Slurm's (one task per GPU under srun), else a single process."""
    if torchrun in os.environ:
        return os.environ[torchrun]
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        return os.environ.get(slurm, default)
    return default


def world_size_from_env() -> int:
    return int(_env("WORLD_SIZE", "SLURM_NTASKS", "1"))


def init_distributed(parallel: ParallelConfig, seed: int) -> Topology:
    """Start the default process group (torchrun env, or a single local process) and Megatron's groups.

    Every collective, the rendezvous included, gives up after ``parallel.timeout_minutes``: a rank
    whose peers are gone (or hung) exits with an error instead of waiting."""
    rank = int(_env("RANK", "SLURM_PROCID", "0"))
    world_size = world_size_from_env()
    timeout = timedelta(minutes=parallel.timeout_minutes)
    if launched_by_launcher(world_size):
        watch_launcher()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(_env("LOCAL_RANK", "SLURM_LOCALID", "0")))
        # A single process needs no rendezvous: an in-memory store, no port to collide on.
        store = dist.HashStore() if world_size == 1 else None
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            rank=rank, world_size=world_size, timeout=timeout, store=store,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        hierarchical_context_parallel_sizes=parallel.hierarchical_cp_sizes,
        distributed_timeout_minutes=parallel.timeout_minutes,  # Megatron passes it to timedelta: floats work
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Topology(
        rank=rank,
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        is_last_stage=parallel_state.is_pipeline_last_stage(),
    )


def shutdown() -> None:
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
