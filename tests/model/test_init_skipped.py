"""A start that loads a checkpoint skips the random initialisation, and the weights it trains
from are exactly the checkpoint's: the model's (read back independently through the converters'
reader) and the bf16 optimizer's fp32 main copies of them."""

from __future__ import annotations

import shutil

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from trainrun import train

from megatron_prolong.config import ProLongConfig, register_configs
from megatron_prolong.train.checkpoint import will_load

register_configs()

SMALL = ("model.num_layers=2", "data.seq_length=128", "data.synthetic_sequences=16", "train.global_batch_size=2",
         "train.micro_batch_size=1", "train.precision=bf16", "log.tensorboard=false")
DRAWN = "random initialisation: drawn"
SKIPPED = "random initialisation: skipped"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished bf16 run with a checkpoint at step 2 (model and optimizer)."""
    return train(tmp_path_factory.mktemp("saved") / "run", *SMALL, "train.steps=2", "checkpoint.save_interval=2")


def test_will_load_decides_before_the_model_is_built(saved, tmp_path):
    assert not will_load(tmp_path / "checkpoints", None)
    assert will_load(saved.dir / "checkpoints", None)  # a resume
    assert will_load(tmp_path / "checkpoints", str(saved.dir))  # checkpoint.load
    with pytest.raises(FileNotFoundError, match="not a megatron-prolong checkpoint"):
        will_load(tmp_path / "checkpoints", str(tmp_path / "nothing"))


def test_a_fresh_run_draws_and_a_resume_skips(saved, tmp_path):
    assert DRAWN in saved.output and SKIPPED not in saved.output
    run_dir = tmp_path / "run"
    shutil.copytree(saved.dir, run_dir)
    resumed = train(run_dir, *SMALL, "train.steps=3", "checkpoint.save_interval=0")
    assert SKIPPED in resumed.output and DRAWN not in resumed.output, resumed.output[-3000:]
    assert "resumed from" in resumed.output and len(resumed.losses) == 3


def _config(*overrides: str) -> ProLongConfig:
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("mode", ["resume", "load"])
def test_training_starts_from_the_checkpoints_exact_weights(saved, tmp_path, capsys, mode):
    """A resume (model and optimizer) and a model-only ``checkpoint.load``."""
    from megatron_prolong.convert.mcore import DistCheckpointReader
    from megatron_prolong.inference import megatron_session
    from megatron_prolong.train.checkpoint import resolve_checkpoint

    run_dir = tmp_path / "run"
    if mode == "resume":
        shutil.copytree(saved.dir, run_dir)
        overrides = ("train.steps=3",)
    else:
        overrides = (f"checkpoint.load={saved.dir}", "checkpoint.load_optimizer=false")
    cfg = _config(*SMALL, f"run.dir={run_dir}", *overrides)
    with megatron_session(cfg.parallel, cfg.train.seed) as topo:
        from megatron_prolong.train.loop import Trainer

        trainer = Trainer(cfg, topo).build()
        assert SKIPPED in capsys.readouterr().out
        params = dict(trainer.model.module.named_parameters())
        reader = DistCheckpointReader(resolve_checkpoint(saved.dir))
        names = []
        for name, saved_tensor in reader.tensors(cfg.model, trainer.vocab_size):
            assert torch.equal(params[name].detach()[: saved_tensor.shape[0]], saved_tensor), name
            names.append(name)
        assert sorted(names) == sorted(params), "every parameter must come from the checkpoint"
        # bf16: the optimizer steps fp32 main copies. Loaded with the optimizer they are the saved
        # ones (the model holds them rounded to bf16); model only, they are the loaded weights.
        pairs = [(p, m) for inner in trainer.optimizer.chained_optimizers
                 for g16, g32 in zip(inner.float16_groups, inner.fp32_from_float16_groups)
                 for p, m in zip(g16, g32)]
        assert len(pairs) == len(params)
        for p, m in pairs:
            if mode == "load":
                assert torch.equal(p.detach().float(), m.detach())
            else:
                assert torch.equal(p.detach(), m.detach().to(p.dtype))
