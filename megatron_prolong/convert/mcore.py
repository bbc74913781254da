"""The Megatron side of the converters: read and write Megatron distributed checkpoints.

Reading never builds a model: each checkpoint key (all layers of one tensor kind, stacked) is
loaded whole at its global shape, so a checkpoint saved with any TP/PP/CP layout reads the same,
one tensor kind at a time. Writing builds the TP=1 GPTModel once (one copy of the weights), fills
it from the incoming stream and saves its own ``sharded_state_dict`` (so the result is exactly
what the trainer's model expects, whatever layout the trainer later uses).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch

from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig
from megatron_prolong.convert.common import progress, warn
from megatron_prolong.convert.mapping import ConversionError, Shapes, canonical_param, entries, expected_shape, fmt
from megatron_prolong.inference import META, SHARDING_META, dtype_name, is_dist_checkpoint, tensors_metadata, verify_safe
from megatron_prolong.tokenizer import TokenizerConfig, checkpoint_record, tokenizer_files, unique_ids

FORMAT = "megatron-prolong/1"


class DistCheckpointReader:
    """Tensors of a Megatron distributed checkpoint by key, at their global (TP=1) shapes.

    ``prefix`` is what the saving framework put in front of GPTModel's own keys
    (``module.`` for NeMo 2, ``model.`` for NeMo 1, nothing for this project's checkpoints).
    """

    def __init__(self, path: str | Path, prefix: str | None = None) -> None:
        self.path = Path(path)
        if not is_dist_checkpoint(self.path):
            raise ConversionError(f"{self.path} is not a Megatron distributed checkpoint (no metadata.json)")
        verify_safe(self.path)
        self.metadata = tensors_metadata(self.path)
        self.prefix = self._detect_prefix() if prefix is None else prefix

    def _detect_prefix(self) -> str:
        suffix = "embedding.word_embeddings.weight"
        hits = [k for k in self.metadata if k.endswith(suffix) and "optimizer" not in k]
        if not hits:
            raise ConversionError(
                f"{self.path} holds no GPT model weights (no '*{suffix}' key); is it a Llama/GPT checkpoint?"
            )
        return min(hits, key=len)[: -len(suffix)]

    def has(self, key: str) -> bool:
        return self.prefix + key in self.metadata

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.metadata[self.prefix + key].global_shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata[self.prefix + key].dtype

    def load(self, key: str) -> torch.Tensor:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        full = self.prefix + key
        if full not in self.metadata:
            raise ConversionError(f"{self.path} has no tensor {full!r}")
        md = self.metadata[full]
        buf = torch.empty(tuple(md.global_shape), dtype=md.dtype)
        sharded = {full: ShardedTensor.from_rank_offsets(full, buf, replica_id=0)}
        return dist_checkpointing.load(sharded, str(self.path))[full]

    def tensors(self, model: ModelConfig, vocab_size: int, desc: str = "reading") -> Iterator[tuple[str, torch.Tensor]]:
        """The canonical stream (GPTModel names, TP=1, vocabulary rows unpadded), one key at a time."""
        shapes = Shapes.of(model, vocab_size)
        es = entries(model)
        if not model.untie_embeddings and self.has("output_layer.weight"):
            raise ConversionError(
                f"{self.path} has a separate output layer but the model config ties embeddings; "
                "the config does not describe this checkpoint"
            )
        total = sum(model.num_layers if e.per_layer else 1 for e in es)
        bar = progress(total, desc)
        for e in es:
            t = self.load(e.ckpt_key)
            layers = range(model.num_layers) if e.per_layer else [None]
            if e.per_layer and t.shape[0] != model.num_layers:
                raise ConversionError(
                    f"{e.ckpt_key} stacks {t.shape[0]} layers but the model config has {model.num_layers}"
                )
            for i in layers:
                x = t[i] if i is not None else t
                if e.vocab:
                    if x.shape[0] < vocab_size:
                        raise ConversionError(
                            f"{e.ckpt_key} has {x.shape[0]} vocabulary rows, fewer than vocab_size={vocab_size}"
                        )
                    x = x[:vocab_size]
                want = expected_shape(e, shapes)
                if tuple(x.shape) != want:
                    raise ConversionError(
                        f"{e.ckpt_key}{'' if i is None else f'[layer {i}]'} has shape {tuple(x.shape)}, "
                        f"expected {want} from the model config"
                    )
                yield fmt(e.param, i), x
                bar.update(1)
            del t
        bar.close()


def build_tp1_model(model: ModelConfig, vocab_size: int, seq_length: int, dtype: torch.dtype):
    """The trainer's GPTModel at TP=1 (plugin attention: no Transformer Engine needed to convert)."""
    from megatron_prolong.model.builder import build_model, build_transformer_config

    model = replace(model, attention_backend="plugin")
    tconfig = build_transformer_config(model, ParallelConfig(), TrainConfig(precision=dtype_name(dtype)))
    return build_model(model, tconfig, vocab_size, seq_length, seed=0)


def fill_model(gpt, tensors: Iterable[tuple[str, torch.Tensor]], model: ModelConfig, vocab_size: int,
               desc: str = "converting") -> None:
    """Copy a canonical stream into the GPTModel's parameters; every parameter must be covered."""
    params = dict(gpt.named_parameters())
    seen: set[str] = set()
    shapes = Shapes.of(model, vocab_size)
    by_param = {fmt(e.param, i): e for e in entries(model)
                for i in (range(model.num_layers) if e.per_layer else [None])}
    bar = progress(len(by_param), desc)
    with torch.no_grad():
        for name, t in tensors:
            name = canonical_param(name)
            if name not in params or name not in by_param:
                raise ConversionError(f"unexpected tensor {name!r} for a Llama GPTModel")
            e = by_param[name]
            want = expected_shape(e, shapes)
            if tuple(t.shape) != want:
                raise ConversionError(f"{name} has shape {tuple(t.shape)}, expected {want} from the model config")
            p = params[name]
            if e.vocab:
                p.zero_()  # padded vocabulary rows: zero
                p[: t.shape[0]].copy_(t)
            else:
                p.copy_(t)
            seen.add(name)
            bar.update(1)
    bar.close()
    missing = sorted(set(by_param) - seen)
    if missing:
        raise ConversionError(f"the input has no weights for {len(missing)} parameters, e.g. {missing[:3]}")


def save_model(gpt, out: Path, prefix: str = "", extra_common: dict | None = None) -> None:
    """Save a model-only Megatron distributed checkpoint of ``gpt`` into ``out``."""
    from megatron.core import dist_checkpointing

    sd = {"model": gpt.sharded_state_dict(prefix=prefix, metadata=SHARDING_META)}
    sd.update(extra_common or {})
    out.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sd, str(out))


def write_meta(out: Path, model: ModelConfig, vocab_size: int, seq_length: int, tokenizer_path: str | None,
               source: dict, token_ids: dict | None = None) -> dict:
    """prolong_meta.json of a conversion output ``out`` (its ``tokenizer/`` already written).

    The tokenizer record is the trainer's (:func:`megatron_prolong.tokenizer.checkpoint_record`),
    with ``token_ids`` (the source model's own bos/eos/pad ids, when it states them) on top.
    """
    meta = {
        "model": asdict(model), "vocab_size": vocab_size, "seq_length": seq_length,
        "tokenizer": folder_record(out / "tokenizer", tokenizer_path, token_ids), "format": FORMAT, "step": 0,
        "has_optimizer": False, "converted_from": source,
    }
    (out / META).write_text(json.dumps(meta, indent=2))
    return meta


def folder_record(folder: Path | None, recorded_path: str | None, token_ids: dict | None = None) -> dict:
    """The tokenizer record (its ids) of a Hugging Face tokenizer folder, saying ``recorded_path``."""
    record = {"kind": "hf", "path": recorded_path, "bos_token_id": None, "eos_token_id": [], "pad_token_id": None}
    if folder is not None and tokenizer_files(folder):
        try:
            record.update(checkpoint_record(TokenizerConfig(kind="hf", path=str(folder))), path=recorded_path)
        except Exception as err:  # files a converter can copy but transformers cannot load
            warn(f"the tokenizer in {folder} does not load ({err}); its special ids are not recorded")
    return merge_token_ids(record, token_ids or {})


def merge_token_ids(record: dict, stated: dict) -> dict:
    """The tokenizer's ids with those a model folder states (config.json / generation_config.json):
    BOS stays the tokenizer's (it is what every prompt and training row starts with), every EOS id of
    either stops generation, a stated pad id wins. A folder whose ids disagree with its tokenizer's
    (transformers' defaults 1 / 2 next to a Llama-3 tokenizer, say) is warned about."""
    bos, eos, pad = stated.get("bos_token_id"), list(stated.get("eos_token_id") or []), stated.get("pad_token_id")
    known = record["bos_token_id"] is not None or record["eos_token_id"]
    if known and ((bos is not None and bos != record["bos_token_id"])
                  or (eos and not set(record["eos_token_id"]) & set(eos))):
        warn(f"the model's config states bos {bos} / eos {eos}, its tokenizer {record['bos_token_id']} / "
             f"{record['eos_token_id']}; keeping the tokenizer's BOS and stopping at every EOS id of both")
    out = dict(record)
    if out["bos_token_id"] is None:
        out["bos_token_id"] = bos
    out["eos_token_id"] = unique_ids(eos + list(record["eos_token_id"]))
    if pad is not None:
        out["pad_token_id"] = pad
    return out


def trainer_overrides(meta: dict, checkpoint_dir: Path) -> list[str]:
    """Hydra overrides that make the trainer build this checkpoint's model and load it."""
    m = meta["model"]
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "vocab_size", "make_vocab_size_divisible_by", "norm_epsilon", "untie_embeddings", "rope_base",
            "rope_scaling", "rope_scaling_factor", "rope_interpolation_factor")
    out = []
    for k in keys:
        v = meta["vocab_size"] if k == "vocab_size" else m.get(k)
        out.append(f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}")
    out.append(f"checkpoint.load={checkpoint_dir}")
    tok = meta.get("tokenizer") or {}
    if tok.get("path"):
        out += ["tokenizer.kind=hf", f"tokenizer.path={tok['path']}"]
    return out
