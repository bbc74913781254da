"""Where a run starts and what its checkpoints hold: one home for the checkpoint policy.

* start: resume this run (its own latest checkpoint: model, optimizer, schedule position, data
  stream, counters, RNG), or start from another run (``checkpoint.load``: model, optionally
  optimizer; schedule and data restart), or fresh. A resume continues the same global data
  stream on any number of processes; a changed learning-rate schedule (``train.lr``,
  ``train.min_lr*``, ``train.warmup_fraction``, ``train.steps``) applies from the current step.
* strictness: a checkpoint whose shapes differ from the config is refused before loading.
* RNG state is kept per parallel coordinate (tp, pp, cp, dp rank). On another DP size, DP rank r
  takes the state of saved DP rank r mod (saved DP size); on another TP/PP/CP layout the seeded
  RNG is kept (the model has no dropout; the RNG only matters for what a user adds).
* retention (``checkpoint.keep_last`` / ``keep_every``) and the size report printed at start.
* room: a save the checkpoint folder's filesystem cannot hold is refused before anything is
  written, at start (the run's first save) and before every save, in one line naming the fix; the
  checkpoints already there are untouched.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from megatron_prolong.config import ProLongConfig
from megatron_prolong.parallel.distributed import Topology
from megatron_prolong.tokenizer import Tokenizer, checkpoint_record
from megatron_prolong.train import checkpoint as ckpt
from megatron_prolong.train.memory import rank_params

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# scheduler state key -> the setting users change
_SCHEDULE_KEYS = {"max_lr": "train.lr", "min_lr": "floor (train.min_lr / min_lr_ratio)", "lr_warmup_steps": "warmup steps (train.warmup_fraction x train.steps)",
                  "lr_decay_steps": "train.steps", "lr_decay_style": "train.lr_decay_style",
                  "start_wd": "train.weight_decay"}


def checkpoint_bytes_per_param(precision: str, distributed_optimizer: bool) -> tuple[int, str]:
    """Bytes one parameter takes in a checkpoint with optimizer state, and what they are (the
    distributed optimizer also saves its fp32 copy of fp32 weights)."""
    if precision == "bf16":
        return 14, "bf16 weights + fp32 master weights + fp32 Adam moments"
    if distributed_optimizer:
        return 16, "fp32 weights + the distributed optimizer's fp32 copy + fp32 Adam moments"
    return 12, "fp32 weights + fp32 Adam moments"


def save_steps(steps: int, interval: int) -> list[int]:
    """The steps a run saves at: every ``interval`` steps and the last one."""
    return sorted(set(range(interval, steps + 1, interval) if interval else ()) | {steps})


def retention(saves: list[int], keep_last: int | None, keep_every: int | None) -> tuple[int, int]:
    """(checkpoints left at the end, most on disk at once: the kept ones plus the one being written)."""
    kept: list[int] = []
    peak = 0
    for s in saves:
        kept.append(s)
        peak = max(peak, len(kept))
        removed = set(ckpt.prune_plan(kept, keep_last, keep_every))
        kept = [k for k in kept if k not in removed]
    return len(kept), peak


def _si(n: float, unit: str) -> str:
    prefixes = ("", "k", "M", "G", "T")
    i = 0
    while n >= 1000 and i < len(prefixes) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.3g} {prefixes[i]}{unit}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


@dataclass(frozen=True)
class DiskEstimate:
    params: int
    bytes_per_param: int
    what: str
    saves: int
    kept: int  # left at the end
    peak: int  # on disk at once: the kept ones plus the one being written
    policy: str

    @property
    def each(self) -> int:
        return self.params * self.bytes_per_param

    def report(self, root: Path) -> str:
        return (f"checkpoints: about {_si(self.each, 'B')} each ({_count(self.params)} parameters x "
                f"{self.bytes_per_param} bytes: {self.what}); {self.saves} saves ({self.policy}): {self.kept} "
                f"left at the end, {_si(self.kept * self.each, 'B')} (up to {_si(self.peak * self.each, 'B')} "
                f"while one is written) in {root}")


def estimate_disk(cfg: ProLongConfig, vocab_size: int) -> DiskEstimate:
    """Bytes per checkpoint (parameters x bytes each) and checkpoints on disk under the retention policy."""
    c = cfg.checkpoint
    per_param, what = checkpoint_bytes_per_param(cfg.train.precision, cfg.parallel.distributed_optimizer)
    saves = save_steps(cfg.train.steps, c.save_interval)
    kept, peak = retention(saves, c.keep_last, c.keep_every)
    policy = (f"checkpoint.keep_last={c.keep_last}, keep_every={c.keep_every}" if c.keep_last
              else "checkpoint.keep_last unset: all are kept")
    return DiskEstimate(rank_params(cfg.model, vocab_size, tp=1, pp=1), per_param, what, len(saves), kept, peak,
                        policy)


#: room asked for beyond the size estimate (within 2% of a saved checkpoint; metadata, RNG, data state)
ROOM_MARGIN = 1.05


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path``, or will once it is created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


class CheckpointManager:
    """How a run starts (resume, start from ``checkpoint.load``, or fresh) and what its checkpoints hold."""

    def __init__(self, cfg: ProLongConfig, topo: Topology, vocab_size: int, tokenizer: Tokenizer,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.topo, self.vocab_size, self.log = cfg, topo, vocab_size, log
        self.root = Path(cfg.run.dir) / "checkpoints"
        self.meta = {"model": asdict(cfg.model), "vocab_size": vocab_size, "seq_length": cfg.data.seq_length,
                     "tokenizer": checkpoint_record(cfg.tokenizer, tokenizer), "format": "megatron-prolong/1",
                     "layout": self._layout()}
        self.tokenizer_dir = Path(cfg.tokenizer.path) if cfg.tokenizer.kind == "hf" else None
        self._repair_interrupted_saves()
        self.resume = self._resume_from()
        self._refuse_damaged()

    # -- start ---------------------------------------------------------------------------------
    def _repair_interrupted_saves(self) -> None:
        """One rank repairs a save killed between its renames (this run's and ``checkpoint.load``'s)
        and removes this run's saves killed before them; the others wait, then read (on a shared
        file system they would race on the rename)."""
        if self.topo.rank == 0:
            load = Path(self.cfg.checkpoint.load) if self.cfg.checkpoint.load else None
            for root in (self.root, *((load, load / "checkpoints") if load else ())):
                ckpt.repair_interrupted_save(root)
            # a save of this run that died before its rename (a full disk, a kill): no save of this
            # run is under way yet, and the room check must not count the space it holds
            for unfinished in self.root.glob(".iter_*.tmp"):
                shutil.rmtree(unfinished, ignore_errors=True)
                self.log(f"removed {unfinished}, a save that did not finish")
        torch.distributed.barrier()

    def _resume_from(self) -> Path | None:
        """This run's checkpoint a resume loads: ``checkpoint.resume_step``'s, else the latest."""
        step = self.cfg.checkpoint.resume_step
        latest = ckpt.latest_checkpoint(self.root)
        if step is None:
            return latest
        if latest is not None and int(latest.name[5:]) > step and not ckpt.damage(latest):
            # Saved past it since (a requeue repeats the command): the override has done its job.
            self.log(f"note: checkpoint.resume_step={step} is older than this run's intact latest checkpoint; "
                     f"resuming from {latest}")
            return latest
        path = ckpt.iter_dir(self.root, step)
        if not (path / ckpt.META).is_file():
            raise ckpt.CheckpointError(f"checkpoint.resume_step={step}: {path} is not a saved checkpoint; saved "
                                       f"steps: {ckpt.saved_steps(self.root) or 'none'}")
        return path

    def _refuse_damaged(self) -> None:
        """Check the checkpoint this start loads against what its save wrote, before anything is built."""
        load = self.cfg.checkpoint.load
        resume = self.resume
        source = resume or (ckpt.resolve_checkpoint(load) if load else None)
        problem = source and ckpt.damage(source)
        if not problem:
            return
        if resume is None:
            raise ckpt.CheckpointError(f"checkpoint.load: {source} is damaged: {problem}; load an intact copy")
        older = [s for s in reversed(ckpt.saved_steps(self.root)) if s < int(source.name[5:])]
        intact = next((s for s in older if not ckpt.damage(ckpt.iter_dir(self.root, s))), None)
        advice = (f"the newest intact one is {ckpt.iter_dir(self.root, intact)}: resume from it with "
                  f"checkpoint.resume_step={intact}" if intact is not None else
                  "no older intact checkpoint is left: start a new run.dir")
        raise ckpt.CheckpointError(f"checkpoint {source} is damaged: {problem}; {advice} (the damaged one is kept, "
                                   f"and set aside as {source.name}.damaged when its step is saved again)")

    def will_load(self) -> bool:
        """Whether this start loads a checkpoint into every parameter (decided before the model is
        built, so that its random initialisation can be skipped)."""
        return self.resume is not None or ckpt.will_load(self.root, self.cfg.checkpoint.load)

    def restore(self, model: torch.nn.Module, optimizer: MegatronOptimizer,
                scheduler: OptimizerParamScheduler) -> tuple[int, dict | None]:
        """Load what this start needs; returns (step, the run's train state on a resume, else None)."""
        c = self.cfg.checkpoint
        latest = self.resume
        source = latest or (ckpt.resolve_checkpoint(c.load) if c.load else None)
        if source is None:
            return 0, None
        for warning in ckpt.check_compatible(source, self.cfg.model, self.vocab_size):
            self.log(f"note: {warning} (expected when a stage transition rescales RoPE)")
        if latest is None:
            with_opt = c.load_optimizer and ckpt.read_meta(source).get("has_optimizer", True)
            ckpt.load_checkpoint(source, model, optimizer if with_opt else None)
            if not with_opt:  # bf16: the optimizer's fp32 main weights were copied from the unloaded model
                optimizer.reload_model_params()
            scheduler.step(increment=0)  # the loaded param groups carry the old run's learning rate
            self.log(f"initialised from {source} ({'model and optimizer' if with_opt else 'model only'}); "
                     "schedule and data start fresh")
            return 0, None
        state = ckpt.load_checkpoint(latest, model, optimizer)
        step = int(state["step"])
        self._continue_schedule(scheduler, state["scheduler"], step)
        self._restore_rng(latest)
        self.log(f"resumed from {latest} at step {step}")
        return step, ckpt.read_train_state(latest)

    def _continue_schedule(self, scheduler: OptimizerParamScheduler, saved: dict, step: int) -> None:
        """The configured schedule, at the saved position (Megatron would keep the saved values)."""
        changed = [f"{name} {saved[key]} -> {getattr(scheduler, key)}" for key, name in _SCHEDULE_KEYS.items()
                   if key in saved and saved[key] != getattr(scheduler, key)]
        scheduler.step(increment=int(saved["num_steps"]))
        if changed:
            self.log(f"resuming at step {step} with a changed schedule: {', '.join(changed)}; the new "
                     f"settings apply from step {step + 1} (lr now {scheduler.optimizer.param_groups[0]['lr']:.3e})")

    # -- RNG per parallel coordinate -----------------------------------------------------------
    def _coordinate(self, dp_rank: int) -> str:
        t = self.topo
        return f"tp{t.tp_rank}_pp{t.pp_rank}_cp{t.cp_rank}_dp{dp_rank}"

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"tp": p.tp, "pp": p.pp, "cp": p.cp, "dp": self.topo.dp_size}

    def _restore_rng(self, path: Path) -> None:
        saved = ckpt.read_meta(path).get("layout")
        now = self._layout()
        same_model_layout = saved is not None and all(saved[k] == now[k] for k in ("tp", "pp", "cp"))
        state = ckpt.read_rng(path, self._coordinate(self.topo.dp_rank % saved["dp"])) if same_model_layout else None
        if state is None:
            self.log(f"note: {path} has no RNG state for layout {now} (saved: {saved}); keeping the seeded RNG")
            return
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])

    @staticmethod
    def _rng_state() -> dict:
        state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    # -- save and retention --------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """A periodic save (every ``checkpoint.save_interval`` steps) or the last step."""
        interval = self.cfg.checkpoint.save_interval
        return step == self.cfg.train.steps or bool(interval and step % interval == 0)

    def save(self, step: int, model: torch.nn.Module, optimizer: MegatronOptimizer,
             scheduler: OptimizerParamScheduler, *, train_state: dict) -> Path:
        c = self.cfg.checkpoint
        return ckpt.save_checkpoint(
            self.root, step, model, optimizer, scheduler, train_state=train_state,
            rng=(self._coordinate(self.topo.dp_rank), self._rng_state()), meta=self.meta,
            tokenizer_dir=self.tokenizer_dir, keep_last=c.keep_last, keep_every=c.keep_every,
        )

    def check_room(self, device: torch.device, step: int | None = None) -> None:
        """Refuse a save the filesystem has no room for (``step`` None: the run's first, checked at
        start, unless the run is already complete), before anything is written. Every rank
        measures; the least free space counts, so every rank decides alike (a node-local folder
        may differ), and a rank that cannot measure makes every rank refuse."""
        saved = ckpt.saved_steps(self.root)
        if step is None and (saved or [0])[-1] >= self.cfg.train.steps:
            return
        est = estimate_disk(self.cfg, self.vocab_size)
        try:
            mine = float(free_bytes(self.root))
        except OSError:
            mine = -1.0
        free = torch.tensor([mine], dtype=torch.float64, device=device)
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
        room = int(free.item())
        if room < 0:
            raise ckpt.CheckpointError(f"cannot read the free space of {self.root} on every rank: check that "
                                       f"run.dir exists and is writable on every node")
        if room < est.each * ROOM_MARGIN:
            when = "the run's first checkpoint" if step is None else f"the checkpoint of step {step}"
            fix = ("free space, or set run.dir on a larger filesystem" if step is None else
                   f"free space there (e.g. delete older checkpoints in {self.root}: a save is written before the "
                   f"oldest is pruned) and resume; the checkpoints already saved are untouched")
            raise ckpt.CheckpointError(
                f"{when} needs about {_si(est.each, 'B')} in {self.root}, and {_si(room, 'B')} is free there: {fix}")
        if step is None:
            more = est.peak - len(saved)
            if room < more * est.each * ROOM_MARGIN:
                self.log(f"checkpoints: room for {int(room // (est.each * ROOM_MARGIN))} more in {self.root} "
                         f"({_si(room, 'B')} free), and this run has up to {est.peak} on disk at once "
                         f"({est.policy}): set checkpoint.keep_last, or the run stops at the save that does not fit")

    def size_report(self) -> str:
        return estimate_disk(self.cfg, self.vocab_size).report(self.root)
