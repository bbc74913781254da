"""The training loop: Megatron-Core's schedules, DDP and optimizer, the plugin's data and attention."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prolong.config import ProLongConfig
from megatron_prolong.data.loader import MixtureLoader
from megatron_prolong.data.metrics import DomainTracker
from megatron_prolong.data.synthetic import write_synthetic_corpus
from megatron_prolong.model.loss import BlockwiseLoss
from megatron_prolong.model.builder import build_model, build_transformer_config, resolve_attention_backend
from megatron_prolong.parallel.distributed import Topology
from megatron_prolong.tokenizer import build_tokenizer
from megatron_prolong.train import mcore_fixes
from megatron_prolong.train.checkpoint import iter_dir
from megatron_prolong.train.checkpoint_manager import CheckpointManager
from megatron_prolong.train.console import start_lines, summary_line
from megatron_prolong.train.flops import PeakAlarm, gpu_spec, mfu, model_flops_per_step, model_tflops_per_gpu
from megatron_prolong.train.memory import estimate_memory, rank_params
from megatron_prolong.train.metrics import MetricsWriter, StepClock
from megatron_prolong.train.optim import build_optimizer, build_scheduler, step_if_finite
from megatron_prolong.train.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, signals_deferred
from megatron_prolong.train.stats import reduce_step_stats
from megatron_prolong.train.step import forward_step, prepare_micro_batch, prepare_te_micro_batch


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Preempted(Exception):
    """The run saved a checkpoint after a stop signal and should exit with ``exit_code`` (75:
    requeue me; 130: stopped by Ctrl-C)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


class StepHook(Protocol):
    """Called after every step with the step number; returns metrics to log with that step (empty
    when it has nothing to add). In-training evaluation is one, attached by the entry point."""

    def __call__(self, step: int) -> dict[str, float]: ...


class Trainer:
    """``Trainer(cfg, topo).build()`` sets everything up (data, model, optimizer, the checkpoint to
    start from); append :class:`StepHook` s to ``hooks``; then :meth:`run` (or :meth:`train_step`)."""

    def __init__(self, cfg: ProLongConfig, topo: Topology) -> None:
        self.cfg, self.topo = cfg, topo
        self.run_dir = Path(cfg.run.dir)
        self.device = _device()
        self.clock = StepClock(self.device)
        self.hooks: list[StepHook] = []

    def build(self, saves: bool = True) -> Trainer:
        """Write the demo corpus (rank 0), build loader, model and optimizer, restore the checkpoint.
        ``saves=False``: the caller never saves (a benchmark), so no room is asked for on disk."""
        cfg, topo = self.cfg, self.topo
        note = mcore_fixes.apply()  # Megatron-Core work-arounds, before any optimizer state is loaded
        if note:
            self.log(note)
        tokenizer = build_tokenizer(cfg.tokenizer)
        self.vocab_size = cfg.model.vocab_size or tokenizer.vocab_size

        if cfg.data.synthetic:
            if topo.rank == 0:
                write_synthetic_corpus(cfg.data.root, cfg.data.seq_length,
                                       num_sequences=cfg.data.synthetic_sequences, seed=cfg.train.seed)
            dist.barrier()
        t = cfg.train
        self.num_micro_batches = t.global_batch_size // (t.micro_batch_size * topo.dp_size)
        self.loader = MixtureLoader(
            cfg.data, vocab_size=self.vocab_size, seed=t.seed, dp_rank=topo.dp_rank, dp_size=topo.dp_size,
            micro_batch_size=t.micro_batch_size, num_micro_batches=self.num_micro_batches,
        )
        self.backend = resolve_attention_backend(cfg.model)
        self.tconfig = build_transformer_config(cfg.model, cfg.parallel, cfg.train, cfg.kernels)
        # The one place the loss is divided: _loss_func returns sums (loss, tokens) and Megatron's
        # finalize_model_grads (per-token mode) scales the gradients by 1 / the global token count.
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.checkpoints = CheckpointManager(cfg, topo, self.vocab_size, tokenizer, self.log)
        if saves:
            self.checkpoints.check_room(self.device)  # before the model is built
        init = not self.checkpoints.will_load()
        model = build_model(cfg.model, self.tconfig, self.vocab_size, cfg.data.seq_length, t.seed, init=init)
        self.log(f"random initialisation: drawn from seed {t.seed}" if init else
                 "random initialisation: skipped, a checkpoint will be loaded into every parameter")
        model.to(self.device)
        self.model = DistributedDataParallel(
            config=self.tconfig,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                use_distributed_optimizer=cfg.parallel.distributed_optimizer,
                average_in_collective=False,  # the per-token loss divides by the global token count
            ),
            module=model,
        )
        block = cfg.train.loss_block_size
        self.forward_step = partial(forward_step, output_processor=BlockwiseLoss(block, cfg.kernels.cross_entropy) if block else None)
        self.optimizer = build_optimizer(cfg.train, cfg.parallel, [self.model], cfg.kernels.optimizer)
        self.scheduler = build_scheduler(cfg.train, self.optimizer)
        self.domains = DomainTracker(self.loader.domain_names)
        self.peak_tflops = gpu_spec(cfg.train.gpu).bf16_tflops
        p = cfg.parallel
        self.peak_alarm = PeakAlarm(cfg.train.gpu, f"tp={p.tp} pp={p.pp} cp={p.cp} dp={topo.dp_size}", topo.is_logger)
        self.skipped_in_row = 0
        self.log(self.checkpoints.size_report())
        self.step, train_state = self.checkpoints.restore(self.model, self.optimizer, self.scheduler)
        self.load_train_state(train_state or {})
        return self

    # -- checkpoints ---------------------------------------------------------------------------
    def train_state(self) -> dict:
        """The run's global state besides model and optimizer (the same on every rank)."""
        return {"loader": self.loader.state_dict(), "tokens_seen": self.tokens_seen,
                "skipped_total": self.skipped_total, "domains": self.domains.state_dict()}

    def load_train_state(self, state: dict) -> None:
        if "loader" in state:
            self.loader.load_state_dict(state["loader"])
        if "domains" in state:
            self.domains.load_state_dict(state["domains"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.skipped_total = int(state.get("skipped_total", 0))

    def save(self) -> None:
        self.checkpoints.check_room(self.device, self.step)
        with signals_deferred():
            self.checkpoints.save(self.step, self.model, self.optimizer, self.scheduler, train_state=self.train_state())

    # -- training ------------------------------------------------------------------------------
    def _memory_estimate(self) -> str:
        cfg = self.cfg
        est = estimate_memory(cfg.model, cfg.train, cfg.parallel, cfg.data.seq_length, self.topo.world_size,
                              vocab_size=self.vocab_size, gpu=cfg.train.gpu,
                              attention_backend=self.backend)
        return f"{est.total / 2**30:.1f} GiB per GPU of {est.gpu_memory / 2**30:.0f} GiB ({cfg.train.gpu})"

    def log(self, msg: str) -> None:
        if self.topo.is_logger:
            print(f"[megatron-prolong] {msg}", flush=True)

    def use_loader(self, loader: MixtureLoader) -> None:
        """Train on another loader from now on (benchmarks: one data layout at a time)."""
        self.loader = loader
        self.domains = DomainTracker(loader.domain_names)

    def train_step(self) -> dict:
        """One optimizer step over the global batch."""
        cfg, topo = self.cfg, self.topo
        self.clock.start()
        raw = self.loader.next_step()
        counts_here = topo.is_last_stage and topo.tp_rank == 0 and topo.cp_rank == 0
        local_flops = model_flops_per_step(cfg.model, self.vocab_size, cu_seqlens=[mb["cu_seqlens"] for mb in raw]) \
            if counts_here else 0
        if self.backend == "te":
            micro = [prepare_te_micro_batch(mb, cp_size=topo.cp_size, cp_rank=topo.cp_rank, device=self.device)
                     for mb in raw]
        else:
            micro = [prepare_micro_batch(mb, rope_mode=cfg.model.rope_positions, cp_size=topo.cp_size,
                                         cp_rank=topo.cp_rank, device=self.device,
                                         attention=cfg.model.attention)
                     for mb in raw]
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iter(micro),
            model=[self.model],
            num_microbatches=self.num_micro_batches,
            seq_length=cfg.data.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=False,
        )
        stats = reduce_step_stats(outputs, local_flops, topo, len(self.domains.domain_names),
                                  cfg.data.seq_length, self.device)
        step_flops, loss_tokens = stats.flops, stats.loss_tokens
        loss = stats.loss_sum / max(loss_tokens, 1.0)
        lr = self.optimizer.param_groups[0]["lr"]  # this step's; the scheduler moves on in the step
        ok, grad_norm = self._optimizer_step(loss)
        self.step += 1
        self.domains.add_totals(stats.domains)
        step_tokens = cfg.train.global_batch_size * cfg.data.seq_length
        self.tokens_seen += step_tokens
        elapsed = self.clock.elapsed()
        self.peak_alarm.check(self.step, step_flops, elapsed, topo.world_size)
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "loss_tokens": int(loss_tokens),
            "step_time": elapsed,
            "tokens_per_s": step_tokens / elapsed,
            "tokens_per_s_per_gpu": step_tokens / elapsed / topo.world_size,
            "tflops_per_gpu": model_tflops_per_gpu(step_flops, elapsed, topo.world_size),
            "mfu": mfu(step_flops, elapsed, topo.world_size, self.peak_tflops),
            "memory_gib": self.clock.peak_gib(),
            "skipped": 0 if ok else 1,
            "skipped_total": self.skipped_total,
        }

    def _optimizer_step(self, loss: float) -> tuple[bool, float]:
        """Step unless the loss or the gradient norm is not finite; stop after too many in a row."""
        ok, grad_norm = step_if_finite(self.optimizer, loss_finite=math.isfinite(loss))
        if ok:
            self.scheduler.step(increment=1)
            self.skipped_in_row = 0
            return True, grad_norm
        self.skipped_total += 1
        self.skipped_in_row += 1
        limit = self.cfg.train.max_skipped_steps_in_row
        self.log(f"step {self.step + 1}: loss {loss} / gradient norm {grad_norm} not finite, update skipped "
                 f"({self.skipped_in_row} in a row, limit train.max_skipped_steps_in_row={limit})")
        if self.skipped_in_row >= limit:
            raise RuntimeError(
                f"{self.skipped_in_row} steps in a row had a non-finite loss or gradient (last at step "
                f"{self.step + 1}); stopping without saving so the last checkpoint stays good. Lower "
                "train.lr, check the data of these steps, or raise train.max_skipped_steps_in_row"
            )
        return False, grad_norm

    def run(self) -> None:
        cfg = self.cfg
        total = cfg.train.steps
        if self.step >= total:
            self.log(f"run in {self.run_dir} is already complete ({self.step}/{total} steps); "
                     "give another run.dir to start a new run")
            return
        writer = MetricsWriter(self.run_dir, total, cfg.log.tensorboard, self.step) if self.topo.is_logger else None
        mcore_fixes.start_checkpoint_writer_queue()  # before the stop signals are handled (its fix 4)
        preemption = PreemptionHandler(deadline_s=cfg.parallel.timeout_minutes * 60)
        start_step, start_tokens, started = self.step, self.tokens_seen, time.monotonic()
        for line in start_lines(cfg, rank_params(cfg.model, self.vocab_size, tp=1, pp=1), self.peak_alarm.layout,
                                self.backend, self._memory_estimate(), self.step, self.num_micro_batches):
            self.log(line)
        try:
            while self.step < total:
                record = self.train_step()
                evals = {k: v for hook in self.hooks for k, v in hook(self.step).items()}
                if evals or self.step % cfg.log.interval == 0 or self.step == total:
                    record.update({**self.domains.as_dict(), **evals})
                    if writer:
                        writer.write(self.step, record)
                stop = preemption.should_stop(self.device)
                if stop or self.checkpoints.due(self.step):
                    self.save()
                if stop and self.step < total:
                    code = preemption.exit_code
                    self.log(f"{preemption.signal_name}: checkpointed at step {self.step}; " + (
                        f"exiting with {code} so the job is requeued" if code == REQUEUE_EXIT_CODE else
                        f"stopped (exit {code}); the same command resumes from there"))
                    raise Preempted(code)
            self.log(summary_line(cfg, start_step=start_step, step=self.step, tokens=self.tokens_seen - start_tokens,
                                   seconds=time.monotonic() - started, loss=record["loss"],
                                   checkpoint=iter_dir(self.checkpoints.root, self.step)))
        finally:
            preemption.restore()
            if writer:
                writer.close()
