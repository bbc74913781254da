"""Megatron distributed checkpoints, saved atomically, with a tracker of the latest one.

Layout under ``<run.dir>/checkpoints``::

    iter_0000020/                 Megatron dist checkpoint (model, optimizer, scheduler, step)
        prolong_meta.json         model config, RoPE base, sequence length, tokenizer
        extra_rank<r>.pt          per-rank RNG and data-sampler state
    latest_checkpointed_iteration.txt

A save goes to ``.iter_XXXXXXX.tmp`` and is renamed when every rank has finished, and only then
does the tracker move: a crash mid-save leaves the previous checkpoint loadable and tracked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_prolong import safe_checkpoint
from megatron_prolong.train import mcore_fixes

mcore_fixes.apply()

TRACKER = "latest_checkpointed_iteration.txt"
META = "prolong_meta.json"
# fully_reshardable: a checkpoint loads into any TP/PP/CP/DP layout (stage 2 may use another one).
_SHARDING_META = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_checkpoint(root: Path) -> Path | None:
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    path = iter_dir(root, int(tracker.read_text().strip()))
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"{tracker} points at {path}, which is missing or incomplete; remove the tracker to start "
            "over, or restore that checkpoint"
        )
    return path


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


SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "untie_embeddings")


def check_compatible(path: Path, model_cfg, vocab_size: int) -> list[str]:
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
    root: Path, step: int, model, optimizer, scheduler, *, extra: dict, meta: dict,
    keep_last: int | None = None, keep_every: int | None = None,
) -> Path:
    rank = dist.get_rank()
    final = iter_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    sd = _sharded_state(model, optimizer, is_loading=False)
    sd["scheduler"] = scheduler.state_dict()
    sd["step"] = step
    dist_checkpointing.save(sd, str(tmp))
    extra = dict(extra, rng=_rng_state())
    torch.save(extra, tmp / f"extra_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / META).write_text(json.dumps(dict(meta, step=step), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / TRACKER, str(step))
        _prune(root, step, keep_last, keep_every)
    dist.barrier()
    return final


def _prune(root: Path, latest: int, keep_last: int | None, keep_every: int | None) -> None:
    if not keep_last:
        return
    steps = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    recent = set(steps[-keep_last:])
    for s in steps:
        if s in recent or s == latest or (keep_every and s % keep_every == 0):
            continue
        shutil.rmtree(iter_dir(root, s), ignore_errors=True)


def _inner_optimizers(optimizer) -> list:
    return [chained.optimizer for chained in getattr(optimizer, "chained_optimizers", [optimizer])]


def _materialize_adam_state(optimizer) -> bool:
    """Give a fresh torch Adam placeholder state while the load target is built; True if it was fresh.

    Without Apex or Transformer Engine, Megatron's distributed optimizer reads ``step`` from the
    torch optimizer's state when building the state dict to load into, and a new one has none.
    The placeholders are dropped again before ``load_state_dict`` allocates the real state.
    """
    fresh = all(not inner.state for inner in _inner_optimizers(optimizer))
    if fresh:
        for inner in _inner_optimizers(optimizer):
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p].update(step=torch.zeros((), dtype=torch.float32),
                                          exp_avg=torch.zeros_like(p.data), exp_avg_sq=torch.zeros_like(p.data))
    return fresh


def load_checkpoint(path: Path, model, optimizer=None) -> dict:
    """Load model (and optimizer when given) in place; returns scheduler state, step and this rank's extras."""
    safe_checkpoint.verify(path)  # before PyTorch unpickles .metadata and the common state
    fresh = optimizer is not None and _materialize_adam_state(optimizer)
    sd = _sharded_state(model, optimizer, is_loading=True)
    sd["scheduler"] = None
    sd["step"] = None
    loaded = dist_checkpointing.load(sd, str(path))
    _unwrap(model).load_state_dict(loaded["model"])
    if optimizer is not None:
        if fresh:
            for inner in _inner_optimizers(optimizer):
                inner.state.clear()
        optimizer.load_state_dict(loaded["optimizer"])
        mcore_fixes.unshare_adam_steps(_inner_optimizers(optimizer))
    extra_file = Path(path) / f"extra_rank{dist.get_rank()}.pt"
    extra = torch.load(extra_file, weights_only=True) if extra_file.is_file() else {}
    return {"scheduler": loaded.get("scheduler"), "step": loaded.get("step"), "extra": extra}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
