"""``eval.every=N``: a small recall suite and the position-wise loss during training, on the
training ranks and layout (the live model, TP/CP as trained, data-parallel ranks splitting the
samples), logged as ``eval/<task>/<length>`` (percent, 0-100), ``eval/position_loss/<bucket
start>`` and ``eval/seconds``. The tasks and lengths are decided and checked with the configuration
(:mod:`megatron_prolong.eval.settings`); samples and held-out sequences are built once, before the
first step."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from megatron_prolong.config import ConfigError
from megatron_prolong.eval.generate import Generator
from megatron_prolong.eval.position_loss import position_loss, read_sequences
from megatron_prolong.eval.recall import run_recall
from megatron_prolong.eval.rows import EvalInputError
from megatron_prolong.eval.samples import build_samples, read_haystack
from megatron_prolong.eval.settings import plan_training_eval
from megatron_prolong.tokenizer import build_tokenizer, encode_prompt

if TYPE_CHECKING:
    from megatron_prolong.train.loop import Trainer


class TrainingEval:
    """The trainer's step hook for ``eval.every``: called after every step with the step number,
    returns the metrics when ``eval.every`` divides it."""

    def __init__(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        self.every = cfg.eval.every
        self.trainer = trainer
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.max_length = cfg.data.seq_length
        # The same decision as at config time (check_training_eval), where bad settings already stopped.
        plan = plan_training_eval(cfg, self.tokenizer)
        encode = lambda text: encode_prompt(self.tokenizer, text)  # noqa: E731
        try:
            haystack, _ = read_haystack(cfg.eval.haystack_file)
            self.samples = build_samples(plan.tasks, plan.lengths, cfg.eval.samples, encode, cfg.eval.seed,
                                         haystack, self.max_length)
        except EvalInputError as err:
            raise ConfigError(f"eval: {err}") from None
        try:  # its lines are read here only, not at config time: a bad one is still one line, naming the key
            self.rows = read_sequences(cfg.eval.data, encode, cfg.eval.max_sequences) if cfg.eval.data else []
        except EvalInputError as err:
            raise ConfigError(f"eval.data: {err}; give jsonl lines with input_ids or text, or an MDS folder") from None
        left_out = "".join(f"; {t} left out (needs {m} tokens)" for t, m in plan.left_out.items())
        trainer.log(f"eval every {self.every} steps: {', '.join(plan.tasks)} at {', '.join(map(str, plan.lengths))} "
                     f"tokens, {cfg.eval.samples} samples each (scores in percent){left_out}")

    def __call__(self, step: int) -> dict[str, float]:
        if step % self.every:
            return {}
        t = self.trainer
        gpt = t.model.module
        start = time.monotonic()
        was_training = gpt.training
        gpt.eval()
        try:
            with torch.no_grad():
                rope_mode = t.cfg.model.rope_positions
                gen = Generator(gpt, t.vocab_size, rope_mode, self.tokenizer.eos_ids, self.max_length,
                                batch_size=t.cfg.eval.batch_size)
                results = run_recall(gen, self.tokenizer.decode, self.samples, t.topo, t.log)
                out = {f"eval/{task}/{n}": cell["score"] for task, cells in results["tasks"].items()
                       for n, cell in cells.items()}
                if self.rows:
                    pl = position_loss(gpt, self.rows, t.vocab_size, rope_mode, self.max_length, t.topo)
                    out.update({f"eval/position_loss/{b['start']}": b["loss"] for b in pl["buckets"]})
        finally:
            gpt.train(was_training)
        out["eval/seconds"] = time.monotonic() - start
        t.log(f"step {step}: evaluation in {out['eval/seconds']:.1f} s: " +
               ", ".join(f"{k[5:]} {v:.1f}" for k, v in out.items() if k.count("/") == 2 and "position" not in k))
        return out
