"""The checkpoint manager's size report and retention, the presets' disk use, and the version
guard of the Megatron-Core work-arounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainrun import SMALL, assert_checkpoint_size_estimated, compose_config, train

from megatron_prolong.train import mcore_fixes
from megatron_prolong.train.checkpoint_manager import estimate_disk, retention, save_steps

LLAMA3_VOCAB = 128_256
LLAMA3_8B_PARAMS = 8_030_261_248  # Meta-Llama-3-8B's parameter count (its Hugging Face model card: "8B")


@pytest.mark.parametrize("name, saves, kept", [("prolong_64k", 20, 6), ("prolong_512k", 25, 6), ("prolong_sft", 5, 3)])
def test_presets_keep_the_last_two_plus_milestones(name, saves, kept):
    cfg = compose_config(f"experiment={name}")
    assert cfg.checkpoint.keep_last == 2 and cfg.checkpoint.keep_every
    est = estimate_disk(cfg, LLAMA3_VOCAB)
    assert est.params == LLAMA3_8B_PARAMS
    assert est.each == LLAMA3_8B_PARAMS * 14  # 112 GB: bf16 weights, fp32 master weights and Adam moments
    assert (est.saves, est.kept, est.peak) == (saves, kept, kept + 1)
    report = est.report(Path("/ckpt"))
    assert "about 112 GB each (8.03B parameters x 14 bytes" in report and f"{kept} left at the end" in report


def test_retention_counts_what_pruning_keeps():
    assert save_steps(10, 4) == [4, 8, 10] and save_steps(3, 0) == [3]
    # tests/train/test_checkpoint.py::test_keep_last_and_every keeps iter 3, 5 and 6 of 6 saves
    # (while step 6 is written: 3, 4, 5 and 6)
    assert retention(save_steps(6, 1), keep_last=2, keep_every=3) == (3, 4)
    assert retention(save_steps(5000, 250), keep_last=None, keep_every=None) == (20, 20)


def test_size_estimate_matches_a_saved_bf16_checkpoint(tmp_path):
    overrides = (*SMALL, "train.precision=bf16", "train.steps=1", "checkpoint.save_interval=0")
    run = train(tmp_path / "run", *overrides)
    assert "checkpoints: about 42.2 MB each (3.02M parameters x 14 bytes" in run.output
    assert_checkpoint_size_estimated(run.dir, 1, *overrides)


def test_work_arounds_are_applied_only_on_the_megatron_version_they_are_for(monkeypatch):
    monkeypatch.setattr(mcore_fixes._DistOpt, "_set_main_param_and_optimizer_states", mcore_fixes._original)
    monkeypatch.setattr(mcore_fixes.package_info, "MINOR", 20)
    note = mcore_fixes.apply()
    assert "the work-arounds for 0.19" in note and "are not applied" in note and not mcore_fixes.applied()
    monkeypatch.setattr(mcore_fixes.package_info, "MINOR", 19)
    assert mcore_fixes.apply() is None and mcore_fixes.applied()
    assert mcore_fixes.apply() is None and mcore_fixes.applied()  # idempotent
