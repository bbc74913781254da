"""Loading a trainer (or converted) checkpoint into a model for inference, shared by conversion and
evaluation: Megatron's process groups for this process, the checkpoint folder and its meta, its
model config and tokenizer folder, and the GPTModel in any TP/CP layout.

Heavy imports (Megatron) happen inside the functions, so command-line tools start quickly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from megatron_prolong import safe_checkpoint
from megatron_prolong.attention.config import AttentionConfig
from megatron_prolong.config import KernelConfig, ModelConfig, ParallelConfig, TrainConfig
from megatron_prolong.safe_checkpoint import CheckpointError


META = "prolong_meta.json"
# As in megatron_prolong.train.checkpoint: a model-only checkpoint loads into any layout.
SHARDING_META = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise CheckpointError(f"dtype {dtype} is not supported by the trainer's checkpoints; use --dtype fp32 or bf16")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def megatron_session(parallel: ParallelConfig | None = None, seed: int = 0) -> Iterator[Any]:
    """Megatron's process groups for this process (a single gloo/NCCL process unless under torchrun)."""
    import torch.distributed as dist

    from megatron.core import parallel_state

    from megatron_prolong.parallel.cpu_compat import cpu_compat
    from megatron_prolong.parallel.distributed import init_distributed

    with cpu_compat():
        owns = not dist.is_initialized()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        topo = init_distributed(parallel or ParallelConfig(), seed)
        try:
            yield topo
        finally:
            parallel_state.destroy_model_parallel()
            if owns and dist.is_initialized():
                dist.destroy_process_group()


def verify_safe(path: Path) -> None:
    """Refuse a distributed checkpoint whose pickles would run code (see megatron_prolong.safe_checkpoint)."""
    try:
        safe_checkpoint.verify(path)
    except safe_checkpoint.UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from None


def is_dist_checkpoint(path: Path) -> bool:
    return (Path(path) / "metadata.json").is_file() or (Path(path) / ".metadata").is_file()


def tensors_metadata(path: Path) -> dict:
    """Every tensor's global shape and dtype in a distributed checkpoint, by key."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_tensors_metadata(str(path))
    except Exception as err:  # a damaged or foreign folder
        raise CheckpointError(f"cannot read the distributed checkpoint metadata of {path}: {err}") from err


def read_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """A trainer checkpoint (iter folder, checkpoints/ root or run folder) and its meta."""
    from megatron_prolong.train.checkpoint import read_meta, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
        meta = read_meta(ckpt)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from err
    if not is_dist_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} has {META} but no distributed checkpoint (metadata.json); incomplete copy?")
    return ckpt, meta


def model_config_from_meta(meta: dict) -> ModelConfig:
    """The checkpoint's model config; its nested ``attention`` table (a dict in JSON) becomes an
    AttentionConfig again, and keys this version does not know are left out."""
    fields = {k: v for k, v in meta["model"].items() if k in ModelConfig.__dataclass_fields__}
    if isinstance(fields.get("attention"), dict):
        known = AttentionConfig.__dataclass_fields__
        fields["attention"] = AttentionConfig(**{k: v for k, v in fields["attention"].items() if k in known})
    return ModelConfig(**fields)


def checkpoint_tokenizer(ckpt: Path, meta: dict) -> Path | None:
    """The checkpoint's own ``tokenizer/`` copy (what it was trained or converted with), else the
    folder its metadata points at (checkpoints written without a copy)."""
    tok = (meta.get("tokenizer") or {})
    candidates = [ckpt / "tokenizer"]
    if tok.get("kind") == "hf" and tok.get("path"):
        p = Path(tok["path"])
        candidates.append(p if p.is_absolute() else ckpt / p)
    for c in candidates:
        if c.is_dir():
            return c
    return None


def load_model(checkpoint: str | Path, parallel: ParallelConfig, dtype: str | None = None):
    """(GPTModel in eval mode on this rank's device, checkpoint meta). Needs Megatron's groups initialised.

    The plugin's document attention is used whatever backend the checkpoint was trained with, so
    packed lines are scored per document on any machine; the weights are the same either way. The
    trainer's default fused kernels are used where CUDA is (Triton RoPE, fused SwiGLU): unfused,
    RoPE alone is ~20 elementwise kernels per layer, most of a decode step's kernel launches.
    """
    from megatron.core import dist_checkpointing

    from megatron_prolong.model.builder import build_model, build_transformer_config

    ckpt, meta = read_checkpoint(checkpoint)
    verify_safe(ckpt)
    model_cfg = replace(model_config_from_meta(meta), attention_backend="plugin")
    if dtype is None:
        dtype = dtype_name(tensors_metadata(ckpt)["embedding.word_embeddings.weight"].dtype)
    tconfig = build_transformer_config(model_cfg, parallel, TrainConfig(precision=dtype), KernelConfig())
    gpt = build_model(model_cfg, tconfig, int(meta["vocab_size"]), int(meta["seq_length"]), seed=0)
    gpt.to(device())
    sd = {"model": gpt.sharded_state_dict(metadata=SHARDING_META)}
    loaded = dist_checkpointing.load(sd, str(ckpt))
    gpt.load_state_dict(loaded["model"])
    gpt.eval()
    return gpt, meta
