"""Tied embeddings with pipeline parallelism: the last stage's copy of the embedding
(``output_layer.weight``) equals the first stage's after building and after a training step.

Two real processes over gloo, each building the real Trainer (PP = 2, tied embeddings); the last
stage sends its copy to the first, which compares it bitwise.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from trainrun import free_port

from megatron_prolong.config import ProLongConfig, register_configs

register_configs()


def _config(run_dir) -> ProLongConfig:
    overrides = [
        f"run.dir={run_dir}", "model.untie_embeddings=false", "parallel.pp=2", "model.num_layers=2",
        "data.seq_length=64", "data.synthetic_sequences=16", "train.global_batch_size=2",
        "train.micro_batch_size=1", "train.steps=1", "train.precision=fp32", "log.tensorboard=false",
    ]
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def _copies_equal(trainer) -> dict | None:
    """On the first stage: how the last stage's output weight compares with the embedding."""
    gpt = trainer.model.module
    if dist.get_rank() == 0:
        mine = gpt.embedding.word_embeddings.weight.detach()
        theirs = torch.empty_like(mine)
        dist.recv(theirs, src=1)
        return {"equal": torch.equal(mine, theirs), "max_diff": (mine - theirs).abs().max().item(),
                "checksum": mine.double().sum().item()}
    dist.send(gpt.output_layer.weight.detach().contiguous(), dst=0)
    return None


def _worker(rank: int, port: int, cfg: ProLongConfig, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron_prolong.parallel.cpu_compat import cpu_compat
    from megatron_prolong.parallel.distributed import init_distributed, shutdown

    with cpu_compat():
        from megatron_prolong.train.loop import Trainer

        topo = init_distributed(cfg.parallel, cfg.train.seed)
        try:
            trainer = Trainer(cfg, topo).build()
            built = _copies_equal(trainer)
            trainer.train_step()
            stepped = _copies_equal(trainer)
            if rank == 0:
                with open(out, "w") as f:
                    json.dump({"built": built, "stepped": stepped}, f)
        finally:
            shutdown()


def test_tied_embedding_copies_stay_equal_with_pp2(tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(_worker, args=(free_port(), _config(tmp_path / "run"), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["built"]["equal"], result
    assert result["stepped"]["equal"], result
    assert result["stepped"]["checksum"] != result["built"]["checksum"], "the step did not update the embedding"
