"""Megatron distributed checkpoints on disk: saved atomically, with a tracker of the latest one.

Layout under ``<run.dir>/checkpoints``::

    iter_0000020/                 Megatron dist checkpoint (model, optimizer, scheduler, step)
        prolong_meta.json         model config, RoPE base, sequence length, tokenizer ids, saving layout
        tokenizer/                a Hugging Face tokenizer's files (exports and eval read them)
        prolong_manifest.json     what the save wrote: every file's size, a CRC-32 of the small ones
        train_state.pt            the run's global state: data stream, counters (written once)
        rng/tp0_pp0_cp0_dp0.pt    RNG state of each parallel coordinate
    latest_checkpointed_iteration.txt

The data stream and counters are global, so a checkpoint resumes on any number of processes.
A save goes to ``.iter_XXXXXXX.tmp`` and is renamed when every rank has finished, and only then
does the tracker move: a crash mid-save leaves the previous checkpoint loadable and tracked. A
checkpoint damaged later (a full disk, a killed copy) fails its manifest check before loading,
and is never deleted or overwritten by the trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_prolong import safe_checkpoint
from megatron_prolong.safe_checkpoint import CheckpointError
from megatron_prolong.tokenizer import save_tokenizer_files

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_prolong.config import ModelConfig
from megatron_prolong.train import mcore_fixes
from megatron_prolong.train.adam_steps import match_step_layout
from megatron_prolong.train.optim import inner_optimizers, keeps_param_steps

TRACKER = "latest_checkpointed_iteration.txt"
META = "prolong_meta.json"
TRAIN_STATE = "train_state.pt"
MANIFEST = "prolong_manifest.json"
CHECKSUM_MAX_BYTES = 64 << 20  # files up to this size also get a CRC-32 (metadata, small states): cheap
RNG_DIR = "rng"
# fully_reshardable: a checkpoint loads into any TP/PP/CP/DP layout (stage 2 may use another one).
_SHARDING_META = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
# Megatron matches saved to current optimizer param groups by these keys (among others); the
# scheduler sets them from the config, so a changed train.lr / min_lr / weight_decay must not count.
SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def saved_steps(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())


def _replaced(final: Path) -> Path:
    return final.with_name(f".{final.name}.replaced")


def repair_interrupted_save(root: Path) -> None:
    """Put back the old copy of the tracked step when a re-save of it was killed between its two
    renames. Several processes may call this at once (a multi-process tool): the first one moves
    the copy and the others find it in place. The trainer has one rank call it, then a barrier."""
    tracker = root / TRACKER
    if not tracker.is_file():
        return
    path = iter_dir(root, int(tracker.read_text().strip()))
    if not path.exists() and _replaced(path).is_dir():
        try:
            os.replace(_replaced(path), path)
        except FileNotFoundError:
            if not path.is_dir():  # not another process's repair: the copy vanished
                raise


def latest_checkpoint(root: Path) -> Path | None:
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    repair_interrupted_save(root)
    path = iter_dir(root, int(tracker.read_text().strip()))
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"{tracker} points at {path}, which is missing or incomplete; remove the tracker to start "
            "over, or restore that checkpoint"
        )
    return path


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path) -> None:
    """Record every file of a finished save: its size, and a CRC-32 of those up to CHECKSUM_MAX_BYTES."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = f.stat().st_size
        files[str(f.relative_to(folder))] = {"bytes": size, **({"crc32": _crc32(f)} if size <= CHECKSUM_MAX_BYTES else {})}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint against its manifest (None: intact, or saved without one)."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    for name, rec in json.loads(manifest.read_text())["files"].items():
        f = Path(folder) / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec["bytes"]:
            return f"{name} has {size} bytes, the save wrote {rec['bytes']} (truncated: a full disk or a killed copy?)"
        if "crc32" in rec and _crc32(f) != rec["crc32"]:
            return f"{name} differs from what the save wrote (checksum mismatch)"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    meta = Path(path) / META
    if not meta.is_file():
        raise FileNotFoundError(
            f"{path} is not a megatron-prolong checkpoint (no {META}); give the iter_XXXXXXX folder "
            "or a run's checkpoints/ folder"
        )
    return json.loads(meta.read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoints/ root (its latest)."""
    p = Path(path)
    if (p / TRACKER).is_file():
        return latest_checkpoint(p)
    if (p / "checkpoints" / TRACKER).is_file():
        return latest_checkpoint(p / "checkpoints")
    read_meta(p)
    return p


def will_load(root: Path, load: str | None) -> bool:
    """Whether the trainer starts from a checkpoint (a resume under ``root``, or ``checkpoint.load``),
    decided before the model is built so that its random initialisation can be skipped. A
    ``load`` that is not a checkpoint fails here, before anything expensive."""
    if latest_checkpoint(root) is not None:
        return True
    if load:
        resolve_checkpoint(load)
    return bool(load)


SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "untie_embeddings")


def check_compatible(path: Path, model_cfg: ModelConfig, vocab_size: int) -> list[str]:
    """Refuse a checkpoint whose shapes differ from the config; return warnings for what may differ
    on purpose (a stage transition changes the RoPE base and the sequence length)."""
    meta = read_meta(path)
    saved = meta["model"]
    wrong = [f"model.{k}: checkpoint {saved[k]}, config {getattr(model_cfg, k)}"
             for k in SHAPE_KEYS if saved.get(k) != getattr(model_cfg, k)]
    if meta.get("vocab_size") != vocab_size:
        wrong.append(f"vocabulary: checkpoint {meta.get('vocab_size')}, config {vocab_size}")
    if wrong:
        raise ValueError(
            f"checkpoint {path} does not fit the configured model: " + "; ".join(wrong)
            + ". Choose the model preset the checkpoint was made with (or convert the right checkpoint)"
        )
    warnings = []
    for key in ("rope_base", "rope_scaling", "rope_scaling_factor", "rope_interpolation_factor"):
        if saved.get(key) != getattr(model_cfg, key):
            warnings.append(f"model.{key} changes from {saved.get(key)} (checkpoint) to {getattr(model_cfg, key)}")
    return warnings


def _unwrap(model):
    """Checkpoint keys are the GPTModel's own (no DDP ``module.`` prefix): converters rely on them."""
    return getattr(model, "module", model)


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    sd = {"model": _unwrap(model).sharded_state_dict(metadata=_SHARDING_META)}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=_SHARDING_META)
    return sd


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
    *, train_state: dict, rng: tuple[str, dict],
    meta: dict, tokenizer_dir: Path | None = None, keep_last: int | None = None, keep_every: int | None = None,
) -> Path:
    """``train_state``: global (rank 0 writes it); ``rng``: (this rank's coordinate name, its state);
    ``tokenizer_dir``: a Hugging Face tokenizer folder, copied into the checkpoint by rank 0."""
    rank = dist.get_rank()
    final = iter_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = _sharded_state(model, optimizer, is_loading=False)
    sd["scheduler"] = scheduler.state_dict()
    sd["step"] = step
    dist_checkpointing.save(sd, str(tmp))
    (tmp / RNG_DIR).mkdir(exist_ok=True)  # after the save: Megatron warns about a non-empty folder
    torch.save(rng[1], tmp / RNG_DIR / f"{rng[0]}.pt")
    dist.barrier()
    if rank == 0:
        torch.save(train_state, tmp / TRAIN_STATE)
        (tmp / META).write_text(json.dumps(dict(meta, step=step), indent=2))
        if tokenizer_dir is not None:
            save_tokenizer_files(tokenizer_dir, tmp / "tokenizer")
        write_manifest(tmp)
        replaced = _replaced(final)
        if final.exists() and damage(final):  # resumed from an earlier step past a damaged one: keep it aside
            os.replace(final, final.with_name(f"{final.name}.damaged"))
        elif final.exists():  # a save of a step saved before: the old copy goes only once the new one is in place
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        _write_atomic(root / TRACKER, str(step))
        # Checkpoints after this step (a resume from an earlier one, past a damaged one) are left alone.
        for s in prune_plan([s for s in saved_steps(root) if s <= step], keep_last, keep_every):
            shutil.rmtree(iter_dir(root, s), ignore_errors=True)
    dist.barrier()
    return final


def prune_plan(steps: list[int], keep_last: int | None, keep_every: int | None) -> list[int]:
    """The saved steps (ascending) that retention removes: all but the newest ``keep_last`` and
    the multiples of ``keep_every`` (nothing when keep_last is unset)."""
    if not keep_last:
        return []
    recent = set(steps[-keep_last:])
    return [s for s in steps if s not in recent and not (keep_every and s % keep_every == 0)]


def _param_groups(optimizer) -> list[dict]:
    return [g for inner in inner_optimizers(optimizer) for g in inner.param_groups]


@contextlib.contextmanager
def _groups_keyed_as_saved(optimizer, saved_schedule: dict | None):
    """Let Megatron pair saved and current param groups although the schedule's values changed;
    the current (configured) values are put back once the saved state is in."""
    current = [{k: g[k] for k in SCHEDULE_GROUP_KEYS if g.get(k) is not None} for g in _param_groups(optimizer)]
    for g, values in zip(_param_groups(optimizer), current):
        g.update({k: saved_schedule[k] for k in values if k in (saved_schedule or {})})
    try:
        yield
    finally:
        for g, values in zip(_param_groups(optimizer), current):
            g.update(values)


def load_checkpoint(path: Path, model: torch.nn.Module | None, optimizer: MegatronOptimizer | None = None) -> dict:
    """Load model (and optimizer when given) in place; returns the scheduler state and the step."""
    safe_checkpoint.verify(path)  # before PyTorch unpickles .metadata and the common state
    fresh = optimizer is not None and mcore_fixes.materialize_adam_state(optimizer)
    sd = _sharded_state(model, optimizer, is_loading=True)
    sd["scheduler"] = None
    sd["step"] = None
    loaded = dist_checkpointing.load(sd, str(path))
    _unwrap(model).load_state_dict(loaded["model"])
    if optimizer is not None:
        if fresh:
            mcore_fixes.drop_placeholder_state(optimizer)
        # the step counter where this Adam implementation keeps it, whichever one saved it
        match_step_layout(loaded["optimizer"], keeps_param_steps(optimizer))
        with _groups_keyed_as_saved(optimizer, loaded.get("scheduler")):
            optimizer.load_state_dict(loaded["optimizer"])
        mcore_fixes.unshare_adam_steps(optimizer)
    return {"scheduler": loaded.get("scheduler"), "step": loaded.get("step")}


def read_train_state(path: Path) -> dict:
    """The run's global state; checkpoints from before train_state.pt kept it in every extra_rank<r>.pt."""
    for name in (TRAIN_STATE, "extra_rank0.pt"):
        if (Path(path) / name).is_file():
            return torch.load(Path(path) / name, weights_only=True)
    raise FileNotFoundError(f"{path} has no {TRAIN_STATE}: not a checkpoint written by the trainer")


def read_rng(path: Path, name: str) -> dict | None:
    f = Path(path) / RNG_DIR / f"{name}.pt"
    return torch.load(f, weights_only=True) if f.is_file() else None
