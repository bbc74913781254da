"""Adam's step counter across Adam implementations (megatron_prolong/train/adam_steps.py).

Megatron-Core builds TE's FusedAdam where Transformer Engine imports and torch's AdamW here, and
a checkpoint of one must resume in the other. FusedAdam needs CUDA and TE, so this side writes
FusedAdam's layout itself: after real steps of the trainer's torch AdamW, each parameter's
``step`` tensor is removed and the count goes into every parameter group as an int, which is
what FusedAdam's ``state_dict`` holds (its moments are the same tensors). Megatron then saves it
as it would FusedAdam's. The resume loads it into torch's AdamW through the trainer's loader and
must continue the uninterrupted run exactly: a step counter lost or restarted changes Adam's bias
correction, and so the losses from the first step after the resume. tests/gpu/test_te_checkpoint.py
runs the trainer's resume with TE's FusedAdam on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from trainrun import SMALL, compose_config

from megatron_prolong.inference import megatron_session
from megatron_prolong.train.adam_steps import match_step_layout
from megatron_prolong.train.optim import inner_optimizers, keeps_param_steps

TINY = (*SMALL, "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "train.global_batch_size=2",
        "train.steps=4", "checkpoint.save_interval=0")


def _build(run_dir, *overrides: str):
    from megatron_prolong.train.loop import Trainer

    cfg = compose_config(*TINY, f"run.dir={run_dir}", *overrides)
    return cfg, lambda topo: Trainer(cfg, topo).build()


def _as_fused_adam_holds_it(optimizer) -> None:
    for inner in inner_optimizers(optimizer):
        (step,) = {float(inner.state[p].pop("step")) for g in inner.param_groups for p in g["params"]}
        for g in inner.param_groups:
            g["step"] = int(step)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_checkpoint_with_fused_adams_step_layout_resumes_torch_adamw_exactly(tmp_path, precision):
    cfg, build = _build(tmp_path / "ref", f"train.precision={precision}")
    with megatron_session(cfg.parallel, cfg.train.seed) as topo:
        trainer = build(topo)
        reference = [trainer.train_step() for _ in range(4)]

    cfg, build = _build(tmp_path / "run", f"train.precision={precision}")
    with megatron_session(cfg.parallel, cfg.train.seed) as topo:
        trainer = build(topo)
        first = [trainer.train_step() for _ in range(2)]
        assert keeps_param_steps(trainer.optimizer)
        _as_fused_adam_holds_it(trainer.optimizer)
        trainer.save()
    with megatron_session(cfg.parallel, cfg.train.seed) as topo:
        resumed = build(topo)
        assert resumed.step == 2
        steps = [s for inner in inner_optimizers(resumed.optimizer) for s in inner.state.values()]
        assert steps and all(float(s["step"]) == 2.0 for s in steps)
        assert all("step" not in g for inner in inner_optimizers(resumed.optimizer) for g in inner.param_groups)
        rest = [resumed.train_step() for _ in range(2)]
    got = first + rest
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in reference], key


def test_step_layouts_of_a_real_optimizer_state_convert_both_ways(tmp_path):
    cfg, build = _build(tmp_path / "run", "train.precision=bf16")
    with megatron_session(cfg.parallel, cfg.train.seed) as topo:
        trainer = build(topo)
        for _ in range(3):
            trainer.train_step()
        model_sd = trainer.model.module.sharded_state_dict()
        sd = trainer.optimizer.sharded_state_dict(model_sd)
    inner = sd["optimizer"]  # Float16OptimizerWithFloat16Params: {"optimizer": torch's, "fp32_from_fp16_params"}
    assert float(inner["state"]["common_step"]) == 3.0  # torch AdamW's, as Megatron saves it
    assert match_step_layout(sd, param_steps=False) == [3]
    assert "common_step" not in inner["state"]
    assert [g["step"] for g in inner["param_groups"]] == [3] * len(inner["param_groups"])
    assert all(type(g["step"]) is int for g in inner["param_groups"])  # FusedAdam's kernel takes an int
    assert match_step_layout(sd, param_steps=True) == [3]
    assert all("step" not in g for g in inner["param_groups"])
    common = inner["state"]["common_step"]
    assert isinstance(common, torch.Tensor) and common.dtype == torch.float32 and float(common) == 3.0


def test_distributed_optimizer_steps_become_ints_for_fused_adam_and_floats_for_torch():
    # Megatron's distributed optimizer keeps the step in its param groups for both implementations
    sd = {"optimizer": {"param_groups": [{"lr": 1.0, "step": 5.0}, {"lr": 2.0, "step": 5.0}]},
          "param_state": {0: {"exp_avg": torch.zeros(2)}}}
    assert match_step_layout(sd, param_steps=False) == [5]
    assert [(g["step"], type(g["step"])) for g in sd["optimizer"]["param_groups"]] == [(5, int)] * 2
    assert match_step_layout(sd, param_steps=True) == [5]
    assert [(g["step"], type(g["step"])) for g in sd["optimizer"]["param_groups"]] == [(5.0, float)] * 2


def test_different_step_counts_are_refused():
    sd = {"optimizer": {"state": {"common_step": torch.tensor(4.0)}, "param_groups": [{"step": 3}]}}
    with pytest.raises(ValueError, match=r"different step counts \[3.0, 4.0\]"):
        match_step_layout(sd, param_steps=True)
