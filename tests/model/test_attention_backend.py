"""``model.attention_backend``: ``auto`` is the plugin path; ``te`` is refused up front when the
installed Transformer Engine cannot run the layout. Only the version lookup is faked."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from megatron_prolong.te import thd as te_thd
from megatron_prolong.config import ConfigError, ModelConfig, ProLongConfig, register_configs, validate
from megatron_prolong.model import builder

register_configs()
TOKENIZER = "tokenizer.path=/models/Meta-Llama-3-8B-Instruct"


def load(*overrides: str) -> ProLongConfig:
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_auto_is_the_plugin_path_even_with_te_and_a_gpu(monkeypatch):
    monkeypatch.setattr(builder, "te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert builder.resolve_attention_backend(ModelConfig(attention_backend="auto")) == "plugin"
    assert builder.resolve_attention_backend(ModelConfig(attention_backend="te")) == "te"


# The 64K preset's selective recompute modules are the plugin path's own; on the TE path a user
# names Megatron-Core's (docs/recipe.md), which the preset's refusal with TE says.
TE_RECOMPUTE = {"prolong_64k": ("train.recompute_modules=[mlp]",), "prolong_512k": ()}


def test_the_64k_preset_with_te_names_the_recompute_modules_to_use():
    cfg = load("experiment=prolong_64k", "model.attention_backend=te", TOKENIZER)
    with pytest.raises(ConfigError, match=r"with model.attention_backend=te use \[core_attn\] or \[mlp\]"):
        validate(cfg, world_size=cfg.parallel.tp * cfg.parallel.cp)


@pytest.mark.parametrize("experiment", ["prolong_64k", "prolong_512k"])
def test_shipped_presets_with_te_before_2_18_are_refused_naming_both_keys(monkeypatch, experiment):
    monkeypatch.setattr(te_thd, "installed_te_version", lambda: "2.17.1")
    cfg = load(f"experiment={experiment}", "model.attention_backend=te", *TE_RECOMPUTE[experiment], TOKENIZER)
    assert cfg.parallel.cp_comm_type == "all_gather" and cfg.parallel.cp > 1
    world = cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.pp
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    msg = str(err.value)
    for words in ("model.attention_backend=te", "parallel.cp_comm_type=all_gather", ">= 2.18", "2.17.1",
                  "parallel.cp_comm_type=p2p", "model.attention_backend=plugin"):
        assert words in msg, msg
    monkeypatch.setattr(te_thd, "installed_te_version", lambda: "2.18.0+8ff60f8")
    validate(cfg, world_size=world)
    monkeypatch.setattr(te_thd, "installed_te_version", lambda: "2.8.0")
    validate(load(f"experiment={experiment}", "model.attention_backend=te", "parallel.cp_comm_type=p2p",
                  *TE_RECOMPUTE[experiment], TOKENIZER), world_size=world)
    validate(load(f"experiment={experiment}", "model.attention_backend=plugin", TOKENIZER), world_size=world)


@pytest.mark.parametrize("kind,first", sorted(te_thd.MIN_TE_FOR_THD_CP.items()))
def test_each_comm_type_needs_its_first_thd_release(monkeypatch, kind, first):
    major, minor = first
    monkeypatch.setattr(te_thd, "installed_te_version", lambda: f"{major}.{minor}.0")
    te_thd.validate_te_version(kind, cp_size=2)
    te_thd.validate_te_version(kind, cp_size=1)
    if minor > 8:
        monkeypatch.setattr(te_thd, "installed_te_version", lambda: f"{major}.{minor - 1}.1")
        with pytest.raises(ValueError, match=re.escape(f"parallel.cp_comm_type={kind} ")):
            te_thd.validate_te_version(kind, cp_size=2)
        te_thd.validate_te_version(kind, cp_size=1)  # no context parallelism: no CP attention path
        with pytest.raises(ValueError, match=re.escape(f"={kind} ")):
            te_thd.validate_te_version(["p2p", kind, "p2p"], cp_size=2)  # one per layer


def test_release_parsing():
    assert te_thd.release("2.18.0+8ff60f8") == (2, 18)
    assert te_thd.release("2.19.0.dev0") == (2, 19)
    assert te_thd.release("2.8") == (2, 8)
    assert te_thd.release("2.10.0rc1") == (2, 10)


def test_te_without_te_installed_is_refused_before_anything_starts(tmp_path):
    if te_thd.installed_te_version() is not None:
        pytest.skip("Transformer Engine is installed here")
    out = subprocess.run(
        [sys.executable, "-m", "megatron_prolong.train", f"run.dir={tmp_path / 'run'}", "model.attention_backend=te"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model.attention_backend=te but Transformer Engine is not installed" in out.stderr
    assert not (tmp_path / "run").exists()  # refused before the trainer made its run folder
