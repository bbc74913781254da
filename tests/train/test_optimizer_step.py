"""The optimizer step of the trainer, in process: the same numbers as before with one gradient pass
and one gradient-norm all-reduce per step, a non-finite gradient refused, and the step time and peak
memory taken where they mean what they say."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from megatron.core.optimizer import optimizer as mcore_optimizer
from trainrun import SMALL, compose_config

from megatron_prolong.inference import megatron_session
from megatron_prolong.train import metrics
from megatron_prolong.train.metrics import StepClock


# A small model on the CPU: a step takes milliseconds.
TINY = (*SMALL, "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "train.global_batch_size=2",
        "train.steps=3", "checkpoint.save_interval=0")


def _trainer(run_dir, *overrides: str):
    from megatron_prolong.train.loop import Trainer

    cfg = compose_config(*TINY, f"run.dir={run_dir}", *overrides)
    return cfg, lambda topo: Trainer(cfg, topo).build()


def _params(trainer) -> list[torch.Tensor]:
    """The model's weights and the optimizer's fp32 main copies (bf16), detached copies."""
    model = [p.detach().clone() for p in trainer.model.module.parameters()]
    main = [p.detach().clone() for inner in trainer.optimizer.chained_optimizers for p in inner.get_parameters()]
    return model + main


def _train(run_dir, *overrides: str, before_step: Callable | None = None) -> dict:
    cfg, build = _trainer(run_dir, *overrides)
    with megatron_session(cfg.parallel, cfg.train.seed) as topo:
        trainer = build(topo)
        if before_step:
            before_step(trainer)
        records = [trainer.train_step() for _ in range(cfg.train.steps)]
        return {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records],
                "params": _params(trainer)}


def _megatron_step_after_a_separate_norm(self, loss: float) -> tuple[bool, float]:
    """The trainer's optimizer step before this change: the gradient norm taken on its own, then
    Megatron's ``step()``, which takes it (and copies the gradients) again."""
    self.optimizer.prepare_grads()
    grad_norm = float(self.optimizer.get_grad_norm())
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    if ok:
        ok, _, _ = self.optimizer.step()
    if ok:
        self.scheduler.step(increment=1)
    return ok, grad_norm


@pytest.mark.parametrize("precision,distopt", [("fp32", False), ("bf16", False), ("bf16", True)],
                         ids=["fp32", "bf16", "bf16-distopt"])
def test_losses_gradient_norms_and_weights_identical_to_megatrons_step(tmp_path, monkeypatch, precision, distopt):
    """Bit for bit, over three steps with clipping active (grad_clip 0.01: every step is clipped).
    Megatron's own ``step()`` is the reference, so this also catches a Megatron-Core upgrade whose
    ``step()`` does more than the pieces ``step_if_finite`` calls."""
    from megatron_prolong.train.loop import Trainer

    args = (f"train.precision={precision}", "train.grad_clip=0.01", f"parallel.distributed_optimizer={distopt}")
    new = _train(tmp_path / "new", *args)
    monkeypatch.setattr(Trainer, "_optimizer_step", _megatron_step_after_a_separate_norm)
    old = _train(tmp_path / "old", *args)
    assert new["loss"] == old["loss"] and new["grad_norm"] == old["grad_norm"]
    assert all(n > 0.01 for n in new["grad_norm"])  # clipping took part
    assert len(new["params"]) == len(old["params"])
    assert all(torch.equal(a, b) for a, b in zip(new["params"], old["params"]))


def test_one_gradient_pass_and_one_norm_all_reduce_per_step(tmp_path, monkeypatch):
    counts = {"norm": 0, "all_reduce_in_norm": 0, "copy": 0}
    norm_fp32, all_reduce = mcore_optimizer.get_grad_norm_fp32, torch.distributed.all_reduce

    def counted_all_reduce(*args, **kwargs):
        counts["all_reduce_in_norm"] += 1
        return all_reduce(*args, **kwargs)

    def counted_norm(*args, **kwargs):
        counts["norm"] += 1
        with monkeypatch.context() as m:
            m.setattr(torch.distributed, "all_reduce", counted_all_reduce)
            return norm_fp32(*args, **kwargs)

    copy = mcore_optimizer.Float16OptimizerWithFloat16Params._copy_model_grads_to_main_grads

    def counted_copy(self):
        counts["copy"] += 1
        return copy(self)

    monkeypatch.setattr(mcore_optimizer, "get_grad_norm_fp32", counted_norm)
    monkeypatch.setattr(mcore_optimizer.Float16OptimizerWithFloat16Params, "_copy_model_grads_to_main_grads",
                        counted_copy)
    run = _train(tmp_path / "run", "train.precision=bf16")
    steps = len(run["loss"])
    assert counts == {"norm": steps, "all_reduce_in_norm": steps, "copy": steps}, counts


def test_non_finite_gradient_step_is_skipped_and_logged(tmp_path, capsys):
    """A NaN in one parameter's gradient (the loss stays finite): no update of any weight or of the
    fp32 main copies, no scheduler step, the step logged and counted as skipped; the next step trains."""
    cfg, build = _trainer(tmp_path / "run", "train.precision=bf16", "train.grad_clip=1.0")
    with megatron_session(cfg.parallel, cfg.train.seed) as topo:
        trainer = build(topo)
        trainer.train_step()
        before, lr_step = _params(trainer), trainer.scheduler.num_steps
        weight = next(trainer.model.module.parameters())
        hook = weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        record = trainer.train_step()
        hook.remove()
        assert math.isfinite(record["loss"]) and math.isnan(record["grad_norm"])
        assert record["skipped"] == 1 and trainer.skipped_total == 1 and trainer.scheduler.num_steps == lr_step
        assert all(torch.equal(a, b) for a, b in zip(_params(trainer), before))
        out = capsys.readouterr().out
        assert "step 2: loss" in out and "gradient norm nan not finite, update skipped (1 in a row" in out, out
        after = trainer.train_step()
        assert after["skipped"] == 0 and trainer.skipped_in_row == 0 and math.isfinite(after["grad_norm"])
        assert not all(torch.equal(a, b) for a, b in zip(_params(trainer), before))


class _Recorder:
    """Stands in for the CUDA calls and the clock: records their order."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[str] = []
        self.now = 100.0
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: self.events.append("reset"))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.events.append("sync"))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self._peak)
        monkeypatch.setattr(metrics, "time", SimpleNamespace(monotonic=self._time))

    def _time(self) -> float:
        self.events.append("time")
        self.now += 2.5
        return self.now

    def _peak(self, device=None) -> int:
        self.events.append("peak")
        return 3 * 2**30


def test_step_clock_on_cuda_resets_at_start_and_synchronizes_before_the_time(monkeypatch):
    rec = _Recorder(monkeypatch)
    clock = StepClock(torch.device("cuda", 0))
    clock.start()
    rec.events.append("work")
    assert clock.elapsed() == 2.5 and clock.peak_gib() == 3.0
    assert rec.events == ["reset", "time", "work", "sync", "time", "peak"]


def test_step_clock_off_cuda_makes_no_cuda_call(monkeypatch):
    rec = _Recorder(monkeypatch)
    clock = StepClock(torch.device("cpu"))
    clock.start()
    assert clock.elapsed() == 2.5 and clock.peak_gib() == 0.0
    assert rec.events == ["time", "time"]


def test_trainer_step_times_the_whole_step_on_cuda(tmp_path, monkeypatch):
    """The trainer's clock (made to take the CUDA branch; the model still runs on the CPU): reset
    before the step's first work, synchronize after the optimizer's update and before the time is
    read, and the logged peak and time are the clock's."""
    cfg, build = _trainer(tmp_path / "run")
    with megatron_session(cfg.parallel, cfg.train.seed) as topo:
        trainer = build(topo)
        rec = _Recorder(monkeypatch)
        trainer.clock = StepClock(torch.device("cuda", 0))
        next_step, update = trainer.loader.next_step, trainer.optimizer.step_with_ready_grads
        monkeypatch.setattr(trainer.loader, "next_step", lambda: rec.events.append("data") or next_step())
        monkeypatch.setattr(trainer.optimizer, "step_with_ready_grads",
                            lambda: rec.events.append("update") or update())
        record = trainer.train_step()
    ours = [e for e in rec.events if e in ("reset", "data", "update", "peak")]
    assert ours == ["reset", "data", "update", "peak"], rec.events
    last_sync = len(rec.events) - 1 - rec.events[::-1].index("sync")
    assert rec.events.index("update") < last_sync < len(rec.events) - 1 - rec.events[::-1].index("time")
    assert record["memory_gib"] == 3.0 and record["step_time"] == 2.5


@pytest.mark.parametrize("setting", ["log_num_zeros_in_grad", "grad_norm_skip_threshold", "use_precision_aware_optimizer"])
def test_optimizer_with_a_step_feature_step_if_finite_lacks_is_refused(setting):
    from megatron_prolong.train.optim import _check_step_if_finite_covers

    config = SimpleNamespace(use_precision_aware_optimizer=False, log_num_zeros_in_grad=False,
                             grad_norm_skip_threshold=float("inf"))
    inner = SimpleNamespace(config=config, get_parameters=lambda: [torch.zeros(1)])
    _check_step_if_finite_covers(SimpleNamespace(chained_optimizers=[inner]))  # the trainer's settings
    setattr(config, setting, 10.0 if setting == "grad_norm_skip_threshold" else True)
    with pytest.raises(NotImplementedError, match=setting):
        _check_step_if_finite_covers(SimpleNamespace(chained_optimizers=[inner]))
