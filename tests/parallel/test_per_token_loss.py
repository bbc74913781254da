"""ProLong's loss: the token mean over the whole global batch, even when data-parallel ranks hold
very different numbers of trained tokens (packed SFT batches). Checked by hand over 2 gloo ranks."""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.multiprocessing as mp
from trainrun import free_port

from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig

MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)
S, V = 32, 300


def _batch(rank: int):
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, V, (1, S), generator=g)
    mask = torch.zeros(1, S)
    mask[0, : (4 if rank == 0 else 28)] = 1.0  # 4 vs 28 trained tokens
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
            "cu_seqlens": torch.tensor([[0, S]], dtype=torch.int32), "domain": torch.tensor([0])}


def _build():
    from megatron_prolong.model.builder import build_model, build_transformer_config

    tcfg = build_transformer_config(MODEL, ParallelConfig(), TrainConfig(precision="fp32"))
    return tcfg, build_model(MODEL, tcfg, vocab_size=V, seq_length=S, seed=5)


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      OMP_NUM_THREADS="1")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prolong.parallel.cpu_compat import cpu_compat
    from megatron_prolong.parallel.distributed import init_distributed, shutdown
    from megatron_prolong.train.step import forward_step, prepare_micro_batch

    with cpu_compat():
        init_distributed(ParallelConfig(), seed=1)
        tcfg, model = _build()
        tcfg.finalize_model_grads_func = finalize_model_grads
        ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(average_in_collective=False), model)
        mb = prepare_micro_batch(_batch(rank), rope_mode="continuous", cp_size=1, cp_rank=0,
                                 device=torch.device("cpu"))
        get_forward_backward_func()(forward_step_func=partial(forward_step), data_iterator=iter([mb]),
                                    model=[ddp], num_microbatches=1, seq_length=S, micro_batch_size=1)
        out[rank] = ddp.module.output_layer.weight.main_grad.clone()
        shutdown()


def test_gradient_is_the_global_token_mean():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    assert torch.equal(out[0], out[1])  # both ranks hold the all-reduced gradient

    # By hand, one process: sum of all 32 token losses / 32 (not the mean of the two ranks' means).
    from megatron_prolong.parallel.cpu_compat import cpu_compat
    from megatron_prolong.parallel.distributed import init_distributed, shutdown
    from megatron_prolong.train.step import prepare_micro_batch

    with cpu_compat():
        init_distributed(ParallelConfig(), seed=1)
        _, model = _build()
        total = torch.zeros(())
        for rank in range(2):
            mb = prepare_micro_batch(_batch(rank), rope_mode="continuous", cp_size=1, cp_rank=0,
                                     device=torch.device("cpu"))
            losses = model(mb.tokens, None, None, labels=mb.labels, packed_seq_params=mb.packed)
            total = total + (losses * mb.loss_mask).sum()
        (total / 32).backward()
        expected = model.output_layer.weight.grad
        shutdown()
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-7)
