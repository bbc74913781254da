"""experiment=prolong_64k / prolong_512k / prolong_sft state the recipe's numbers (docs/recipe.md, from the paper and ProLong's scripts) exactly, and
their parallel layouts are valid and fit at the intended world size (64 GPUs = 8 nodes of 8)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from megatron_prolong.config import ProLongConfig, register_configs, validate
from megatron_prolong.train.memory import GiB, check_fits

register_configs()

K = 1024
M = 1024 * 1024
WORLD = 64  # 8 nodes x 8 GPUs


def load(*overrides: str) -> ProLongConfig:
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        raw = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(raw)


def floor(cfg: ProLongConfig) -> float:
    t = cfg.train
    return t.min_lr if t.min_lr is not None else t.lr * t.min_lr_ratio


# docs/recipe.md, "The recipe's numbers and their sources": (sequence length, global batch, steps, tokens per step, total tokens,
# RoPE base, peak LR, warmup fraction, LR floor)
RECIPE = {
    "prolong_64k": (64 * K, 64, 5000, 4 * M, 20e9, 8e6, 1e-5, 0.10, 1e-6),
    "prolong_512k": (512 * K, 16, 2500, 8 * M, 20e9, 1.28e8, 1e-5, 0.10, 1e-6),
    "prolong_sft": (64 * K, 64, 250, 4 * M, 1e9, 1.28e8, 2e-5, 0.05, 2e-6),
}


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_preset_numbers_equal_recipe(name):
    seq, batch, steps, per_step, total, rope, lr, warmup, lr_floor = RECIPE[name]
    cfg = load(f"experiment={name}")
    t, d, m = cfg.train, cfg.data, cfg.model
    assert d.seq_length == seq
    assert t.global_batch_size == batch
    assert t.steps == steps
    assert t.global_batch_size * d.seq_length == per_step  # 4M / 8M / 4M (binary prefixes)
    assert steps * per_step == steps * batch * seq
    # "20B = 5,000 steps x 4M": 20.97e9 with binary M; the paper rounds to 20B / 1B.
    assert steps * per_step == pytest.approx(total, rel=0.05)
    assert m.rope_base == rope
    assert t.lr == lr
    assert t.lr_decay_style == "cosine"
    assert t.warmup_fraction == warmup
    assert floor(cfg) == pytest.approx(lr_floor, rel=1e-12)
    # Optimizer: AdamW b1 0.9 b2 0.95 wd 0.1, clip 1.0, bf16 (fp32 master weights), micro batch 1.
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert t.precision == "bf16" and t.micro_batch_size == 1
    assert cfg.parallel.distributed_optimizer
    # Llama-3-8B(-Instruct) with the Llama-3 tokenizer.
    assert (m.name, m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,
            m.ffn_hidden_size, m.vocab_size) == ("llama3_8b", 32, 4096, 32, 8, 14336, 128256)
    assert cfg.tokenizer.kind == "hf"
    assert cfg.run.name == name
    assert 0 < cfg.checkpoint.save_interval <= steps // 5


def test_floors_follow_the_schedule_module():
    from megatron_prolong.train.optim import min_lr

    assert [min_lr(load(f"experiment={n}").train) for n in ("prolong_64k", "prolong_512k", "prolong_sft")] == [
        pytest.approx(1e-6), pytest.approx(1e-6), 2e-6]


def test_stage2_lr_choice_is_one_override_away():
    paper = load("experiment=prolong_512k")
    script = load("experiment=prolong_512k", "train.lr=5e-6")
    assert paper.train.lr == 1e-5 and script.train.lr == 5e-6
    assert floor(script) == pytest.approx(5e-7)  # the floor stays 10% of the peak
    assert script.train.steps == 2500 and script.model.rope_base == 1.28e8


def test_data_presets_and_sft_mask():
    assert load("experiment=prolong_64k").data.root.endswith("prolong-data-64K")
    assert load("experiment=prolong_512k").data.root.endswith("prolong-data-512K")
    sft = load("experiment=prolong_sft")
    assert sft.data.sft and [d.name for d in sft.data.mixture] == ["prolong-ultrachat-64K"]
    assert not load("experiment=prolong_64k").data.sft


def test_stage_transitions():
    s1, s2, sft = (load(f"experiment={n}") for n in ("prolong_64k", "prolong_512k", "prolong_sft"))
    # Stage 1 starts from converted Llama-3-8B-Instruct weights (no optimizer state in it).
    assert s1.checkpoint.load and not s1.checkpoint.load_optimizer
    # Stage 2 loads stage 1's run (its latest checkpoint) with the optimizer state.
    assert s2.checkpoint.load == s1.run.dir.replace("${run.name}", s1.run.name) == "outputs/prolong_64k"
    assert s2.checkpoint.load_optimizer
    # SFT: stage 2's model weights only.
    assert sft.checkpoint.load == "outputs/prolong_512k" and not sft.checkpoint.load_optimizer


@pytest.mark.parametrize("name", sorted(RECIPE))
@pytest.mark.parametrize("world", [WORLD, 2 * WORLD])
def test_layout_is_valid_at_its_world_size(name, world):
    cfg = load(f"experiment={name}", "tokenizer.path=/models/Meta-Llama-3-8B-Instruct")
    validate(cfg, world_size=world)
    p = cfg.parallel
    assert WORLD % (p.tp * p.pp * p.cp) == 0
    assert p.tp <= 8  # tensor parallelism stays inside a node of 8


@pytest.mark.parametrize("name", sorted(RECIPE))
@pytest.mark.parametrize("backend", ["te", "plugin"])
def test_layout_fits_on_8x80gb_nodes(name, backend):
    cfg = load(f"experiment={name}")
    est = check_fits(cfg.model, cfg.train, cfg.parallel, cfg.data.seq_length, WORLD, gpu="h100_80gb",
                     attention_backend=backend)
    assert est.total < 70 * GiB  # at least ~10 GiB of headroom for the estimate's error


def test_layouts():
    s1, s2 = load("experiment=prolong_64k"), load("experiment=prolong_512k")
    assert (s1.parallel.tp, s1.parallel.cp, s1.parallel.pp, s1.parallel.sequence_parallel) == (2, 4, 1, True)
    assert (s2.parallel.tp, s2.parallel.cp, s2.parallel.pp, s2.parallel.sequence_parallel) == (8, 8, 1, True)
    assert load("experiment=prolong_sft").parallel == s1.parallel
    # 64K: selective recompute (the plugin's modules) lets tp 2 x cp 4 fit with margin; 512K keeps
    # everything (attention is most of its compute)
    assert s1.train.recompute == load("experiment=prolong_sft").train.recompute == "selective"
    assert s1.train.recompute_modules == ["swiglu", "layernorm"] and s2.train.recompute == "none"


def test_cfg_job_prints_the_resolved_preset():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_prolong.train", "experiment=prolong_512k", "--cfg", "job"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.data.seq_length == 524288 and cfg.train.global_batch_size == 16
    assert cfg.model.rope_base == 1.28e8 and cfg.parallel.cp == 8
