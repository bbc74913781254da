"""The checkpoint manager's size report, retention and room check, the presets' disk use, and the
version guard of the Megatron-Core work-arounds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from trainrun import REPO, SMALL, _env, assert_checkpoint_size_estimated, compose_config, free_port, train

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


def test_a_first_checkpoint_the_disk_cannot_hold_is_refused_before_the_model_is_built(tmp_path):
    """A model whose checkpoint (100M layers: about 850 TB) no disk holds: one line naming the
    folder, the sizes and the fixes, exit 2, within seconds and before any checkpoint is written."""
    run = train(tmp_path / "run", *SMALL, "train.steps=1", "model.num_layers=100000000", "train.memory_check=off",
                check=False, timeout=300)
    assert run.proc.returncode == 2, run.output[-3000:]
    line = next(x for x in run.output.splitlines() if x.startswith("megatron-prolong: the run's first checkpoint"))
    assert f"in {tmp_path / 'run' / 'checkpoints'}" in line and " is free there" in line
    assert line.endswith("is free there: free space, or set run.dir on a larger filesystem")
    assert "Traceback" not in run.output and not (tmp_path / "run" / "checkpoints").exists()


ROOM = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch, torch.distributed as dist
    sys.path.insert(0, "tests")
    from trainrun import compose_config
    from megatron_prolong.tokenizer import ByteTokenizer
    from megatron_prolong.train import checkpoint_manager as cm
    from megatron_prolong.train.checkpoint import CheckpointError
    from megatron_prolong.parallel.distributed import Topology
    dist.init_process_group("gloo")
    cfg = compose_config(f"run.dir={sys.argv[1]}", "train.steps=20", "checkpoint.save_interval=5")
    topo = Topology(0, 1, 0, 0, 0, 0, 1, 1, True)
    logged = []
    mgr = cm.CheckpointManager(cfg, topo, ByteTokenizer.vocab_size, ByteTokenizer(), logged.append)
    each = cm.estimate_disk(cfg, ByteTokenizer.vocab_size).each
    cm.free_bytes = lambda path: int(2.5 * each)  # room for two of the four this run keeps
    mgr.check_room(torch.device("cpu"))
    print("LOG", logged)
    cm.free_bytes = lambda path: int(0.5 * each)
    try:
        mgr.check_room(torch.device("cpu"), step=15)
    except CheckpointError as err:
        print("ERR", err)
    dist.destroy_process_group()
""")


def test_room_for_fewer_checkpoints_than_the_run_keeps_is_said_at_start_and_a_save_without_room_refused(tmp_path):
    """The free space is stubbed (the one thing a test cannot shrink); the rest is the manager's."""
    port = free_port()
    done = subprocess.run([sys.executable, "-c", ROOM, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(_env(), RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                                           MASTER_PORT=str(port)))
    out = done.stdout
    assert done.returncode == 0, out[-2000:] + done.stderr[-3000:]
    log = next(x for x in out.splitlines() if x.startswith("LOG"))
    assert "room for 2 more" in log and "up to 4 on disk at once" in log and "set checkpoint.keep_last" in log
    err = next(x for x in out.splitlines() if x.startswith("ERR"))
    assert "the checkpoint of step 15 needs about" in err and "the checkpoints already saved are untouched" in err
    assert "delete older checkpoints in" in err


def test_a_save_that_died_before_its_rename_is_removed_at_start(tmp_path):
    """A full disk or a kill leaves ``.iter_N.tmp``; the next start removes it (it holds up to a
    checkpoint's worth of space the room check must not miss) and the run goes on."""
    run_dir = tmp_path / "run"
    train(run_dir, *SMALL, "train.steps=1", "checkpoint.save_interval=0")
    unfinished = run_dir / "checkpoints" / ".iter_0000002.tmp"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"\0" * 4096)
    resumed = train(run_dir, *SMALL, "train.steps=2", "checkpoint.save_interval=0")
    assert f"removed {unfinished}, a save that did not finish" in resumed.output
    assert not unfinished.exists() and (run_dir / "checkpoints" / "iter_0000002").is_dir()
