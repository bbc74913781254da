"""Invalid configurations fail before any process group starts, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from megatron_prolong.config import ConfigError, ProLongConfig, register_configs, validate

register_configs()


def load(*overrides: str) -> ProLongConfig:
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        raw = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(raw)


def test_default_config_is_the_tiny_demo():
    cfg = load()
    assert cfg.model.name == "tiny" and cfg.tokenizer.kind == "byte" and cfg.data.synthetic
    validate(cfg, world_size=1)


@pytest.mark.parametrize(
    "overrides,world,key",
    [
        (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "train.global_batch_size"),
        (["parallel.cp=2"], 3, "parallel.tp x parallel.pp x parallel.cp"),
        (["train.global_batch_size=6", "train.micro_batch_size=2"], 2, "train.global_batch_size"),
        (["parallel.tp=2"], 3, "parallel.tp"),
        (["parallel.tp=3"], 3, "parallel.tp"),
        (["parallel.pp=3"], 3, "parallel.pp"),
        (["parallel.cp=2", "data.seq_length=1026"], 2, "data.seq_length"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
        (["kernels.rope=fast"], 1, "kernels.rope"),
        (["kernels.cross_entropy=liger"], 1, "kernels.cross_entropy"),
        (["model.rope_positions=absolute"], 1, "model.rope_positions"),
        (["model.attention.kernel=fast"], 1, "model.attention.kernel"),
        (["model.attention.cp_split=ring"], 1, "model.attention.cp_split"),
        (["model.attention.cp_balance_bound=0.9"], 1, "model.attention.cp_balance_bound"),
        (["train.lr=0"], 1, "train.lr"),
        (["model.num_query_groups=3"], 1, "model.num_attention_heads"),
        (["parallel.cp=2", "parallel.cp_comm_type=allgather"], 2, "all_gather"),
        (["parallel.cp=4", "parallel.cp_comm_type=a2a+p2p"], 4, "hierarchical_context_parallel_sizes"),
        (["parallel.cp=4", "parallel.cp_comm_type=a2a", "model.num_query_groups=2"], 4, "parallel.cp_comm_type"),
        (["tokenizer=llama3"], 1, "tokenizer.path"),
        (["train.loss_block_size=-1"], 1, "train.loss_block_size"),
    ],
)
def test_invalid_values_name_the_key(overrides, world, key):
    cfg = load(*overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, world_size=world)


def test_unknown_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="train.stepz"):
        load("train.stepz=3")


def test_wrong_type_is_refused():
    with pytest.raises((ConfigCompositionException, ValidationError), match="train.steps"):
        load("train.steps=many")


def test_entry_point_fails_fast_with_the_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_prolong.train", f"run.dir={tmp_path}/run", "parallel.cp=2",
         "data.seq_length=1002"],
        capture_output=True, text=True, timeout=120, env={"WORLD_SIZE": "2", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "data.seq_length=1002" in proc.stderr and "2 x parallel.cp" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_cfg_job_prints_resolved_config_without_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_prolong.train", f"run.dir={tmp_path}/run", "--cfg", "job"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rope_base: 500000.0" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_layout_that_cannot_fit_is_refused_with_the_estimate(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_prolong.train", f"run.dir={tmp_path}/run", "experiment=prolong_512k",
         "tokenizer.path=/models/llama3", "parallel.tp=1", "parallel.cp=8", "parallel.sequence_parallel=false"],
        capture_output=True, text=True, timeout=120, env={"WORLD_SIZE": "64", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "does not fit in GPU memory at data.seq_length=524288" in proc.stderr and "GiB" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["prolong_128k", "prolong_64K"])
def test_unknown_experiment_is_refused_listing_the_presets(tmp_path, name):
    """Hydra skips a missing *optional* group option: the tiny demo would train instead."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_prolong.train", f"run.dir={tmp_path}/run", f"experiment={name}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"experiment={name} is not a preset" in lines[0], proc.stderr
    assert "prolong_512k, prolong_64k, prolong_sft" in lines[0]
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigCompositionException, match=f"experiment/{name}"):  # compose() refuses it too
        load(f"experiment={name}")


def test_model_parallel_larger_than_the_world_says_how_to_launch():
    with pytest.raises(ConfigError, match=r"torchrun --nproc_per_node 2 .*srun -n 2"):
        validate(load("parallel.tp=2"), world_size=1)
