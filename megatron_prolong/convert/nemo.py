"""NeMo checkpoints <-> the trainer's Megatron distributed checkpoints.

Formats (as NeMo writes them; no NeMo installation is needed here, tests/convert/test_nemo.py
checks them against NeMo 2.5 itself):

- NeMo 2 checkpoint folder::

      weights/            Megatron distributed checkpoint; GPTModel keys prefixed ``module.``
                          (NeMo's MegatronParallel adds it), layers stacked, TE norm names
      context/model.yaml  the model (``_target_``) and its ``config`` (a LlamaConfig / Llama31Config ...)
      context/io.json     fiddle serialisation of the same (read by NeMo's ``io.load_context``;
                          written by convert/nemo_context.py)
      context/nemo_tokenizer/   Hugging Face tokenizer files (AutoTokenizer artifact)

- NeMo 1 ``.nemo`` file: a tar of ``model_config.yaml`` and the weights, either
  ``model_weights/`` (a distributed checkpoint, keys prefixed ``model.``) or
  ``model_weights.ckpt`` (a pickled state dict with per-layer keys ``model.decoder.layers.N...``).

Both directions for NeMo 2, NeMo 1 to Megatron only. Tarballs are checked before extraction:
members with absolute paths, ``..`` components, links or device files are refused. Pickled
weights are read with PyTorch's weights-only loader.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import torch
import yaml

from megatron_prolong import inference
from megatron_prolong.config import ModelConfig
from megatron_prolong.convert import mcore, nemo_context
from megatron_prolong.convert.common import atomic_output, copy_tokenizer, info, tokenizer_files, warn
from megatron_prolong.convert.mapping import ConversionError, Shapes, canonical_param, entries, expected_shape, fmt

NEMO2_PREFIX = "module."
NEMO1_PREFIX = "model."


# ---------------------------------------------------------------------------- model configs
def _need(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise ConversionError(f"{where} has no {key!r}; cannot describe the model")
    return cfg[key]


def _check_llama(cfg: dict, where: str, checks: dict) -> None:
    for key, allowed in checks.items():
        if key in cfg and cfg[key] is not None:
            value = cfg[key]
            if isinstance(value, dict):  # a serialised callable: {_target_: torch.nn.functional.silu}
                value = str(value.get("_target_", value))
            if str(value).lower() not in allowed:
                raise ConversionError(
                    f"unsupported architecture in {where}: {key}={cfg[key]!r} (a Llama needs one of {sorted(allowed)})"
                )


def _model_config(cfg: dict, where: str, name: str, scaling: str, factor: float, *,
                  tied_by_default: bool) -> ModelConfig:
    """The fields NeMo 1 and NeMo 2 name alike (they differ in whether embeddings are tied by default)."""
    heads = int(_need(cfg, "num_attention_heads", where))
    return ModelConfig(
        name=name, num_layers=int(_need(cfg, "num_layers", where)), hidden_size=int(_need(cfg, "hidden_size", where)),
        ffn_hidden_size=int(_need(cfg, "ffn_hidden_size", where)), num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_query_groups") or heads),
        make_vocab_size_divisible_by=int(cfg.get("make_vocab_size_divisible_by") or 128),
        norm_epsilon=float(cfg.get("layernorm_epsilon", 1e-5)), init_method_std=float(cfg.get("init_method_std", 0.02)),
        untie_embeddings=not bool(cfg.get("share_embeddings_and_output_weights", tied_by_default)),
        rope_base=float(cfg.get("rotary_base", 10000)), rope_scaling=scaling, rope_scaling_factor=factor,
        rope_interpolation_factor=cfg.get("seq_len_interpolation_factor"),
    )


def model_config_from_nemo2(cfg: dict, where: str) -> tuple[ModelConfig, int | None, int]:
    """(ModelConfig, vocab_size or None, seq_length) from the ``config`` of context/model.yaml."""
    _check_llama(cfg, where, {
        "normalization": {"rmsnorm"}, "position_embedding_type": {"rope"}, "gated_linear_unit": {"true"},
        "add_bias_linear": {"false"}, "add_qkv_bias": {"false"},
        "activation_func": {"torch.nn.functional.silu", "silu"},
    })
    heads = int(_need(cfg, "num_attention_heads", where))
    hidden = int(_need(cfg, "hidden_size", where))
    kv = cfg.get("kv_channels")
    if kv is not None and int(kv) * heads != hidden:
        raise ConversionError(f"{where}: kv_channels={kv} x heads={heads} != hidden_size={hidden}; not supported")
    scaling, factor = "none", 8.0
    if cfg.get("scale_factor") is not None:  # Llama31Config / Llama32Config
        for key, fixed in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0), ("old_context_len", 8192)):
            if cfg.get(key) is not None and float(cfg[key]) != fixed:
                raise ConversionError(f"{where}: {key}={cfg[key]} is not supported (Megatron fixes it at {fixed})")
        scaling, factor = "llama3", float(cfg["scale_factor"])
    model = _model_config(cfg, where, "nemo", scaling, factor, tied_by_default=False)
    vocab = cfg.get("vocab_size")
    return model, int(vocab) if vocab else None, int(cfg.get("seq_length") or 8192)


def model_config_from_nemo1(cfg: dict, where: str) -> tuple[ModelConfig, int | None, int]:
    if cfg.get("mcore_gpt") is False:
        raise ConversionError(f"{where}: legacy (non-Megatron-Core) NeMo GPT checkpoints are not supported")
    _check_llama(cfg, where, {
        "normalization": {"rmsnorm"}, "position_embedding_type": {"rope"},
        "activation": {"swiglu", "fast-swiglu"}, "bias": {"false"},
    })
    scaling, factor = "none", 8.0
    if cfg.get("scale_positional_embedding"):
        scaling, factor = "llama3", float(cfg.get("scale_factor", 8.0))
    model = _model_config(cfg, where, "nemo1", scaling, factor, tied_by_default=True)
    seq = cfg.get("encoder_seq_length") or cfg.get("max_position_embeddings") or 4096
    vocab = cfg.get("vocab_size")
    return model, int(vocab) if vocab else None, int(seq)


# ---------------------------------------------------------------------------- readers
def _vocab_size(explicit: int | None, from_config: int | None, tokenizer_dir: Path | None, rows: int) -> int:
    if explicit:
        return int(explicit)
    if from_config:
        return int(from_config)
    if tokenizer_dir is not None:
        tok = tokenizer_dir / "tokenizer.json"
        try:
            from transformers import AutoTokenizer

            return len(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
        except Exception as err:  # fall back to the checkpoint's rows
            warn(f"cannot read the tokenizer in {tokenizer_dir} ({err}); {tok}")
    warn(f"vocabulary size unknown (no vocab_size in the config, no tokenizer): using the checkpoint's {rows} rows; "
         "pass --vocab-size to drop padding rows")
    return rows


class StateDictReader:
    """Unstacked per-layer state dict (NeMo 1 ``model_weights.ckpt``) as the canonical stream."""

    def __init__(self, state: dict, prefix: str, where: str) -> None:
        self.where = where
        self.state = {}
        for k, v in state.items():
            if not k.startswith(prefix) or k.endswith("_extra_state") or not isinstance(v, torch.Tensor):
                continue
            self.state[canonical_param(k[len(prefix):])] = v
        if "embedding.word_embeddings.weight" not in self.state:
            raise ConversionError(f"{where} holds no Megatron-Core GPT weights (no {prefix}embedding.word_embeddings.weight)")

    def rows(self) -> int:
        return self.state["embedding.word_embeddings.weight"].shape[0]

    def tensors(self, model: ModelConfig, vocab_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        shapes = Shapes.of(model, vocab_size)
        for e in entries(model):
            for i in (range(model.num_layers) if e.per_layer else [None]):
                name = fmt(e.param, i)
                if name not in self.state:
                    raise ConversionError(f"{self.where} has no tensor {name!r}")
                t = self.state[name][:vocab_size] if e.vocab else self.state[name]
                if tuple(t.shape) != expected_shape(e, shapes):
                    raise ConversionError(f"{self.where}: {name} has shape {tuple(t.shape)}, expected "
                                          f"{expected_shape(e, shapes)} from the model config")
                yield name, t


def _write_mcore(tmp: Path, out: Path, model: ModelConfig, vocab_size: int, seq: int, dtype: torch.dtype,
                 stream: Iterator[tuple[str, torch.Tensor]], tokenizer_dir: Path | None, source: dict) -> None:
    gpt = mcore.build_tp1_model(model, vocab_size, seq, dtype)
    mcore.fill_model(gpt, ((n, t.to(dtype)) for n, t in stream), model, vocab_size, "nemo -> mcore")
    mcore.save_model(gpt, tmp)
    del gpt
    has_tok = copy_tokenizer(tokenizer_dir, tmp / "tokenizer") if tokenizer_dir else False
    if not tokenizer_dir:
        warn("no tokenizer found in the NeMo checkpoint; pass --tokenizer DIR to include one")
    meta = mcore.write_meta(tmp, model, vocab_size, seq, str(out / "tokenizer") if has_tok else None, source)
    (tmp / "train_overrides.txt").write_text(" ".join(mcore.trainer_overrides(meta, out)) + "\n")


def _target_dtype(dtype: str | None, src: torch.dtype) -> torch.dtype:
    if dtype:
        return inference.DTYPES[dtype]
    return torch.bfloat16 if src == torch.bfloat16 else torch.float32


def nemo2_to_mcore(src: str | Path, out: str | Path, *, dtype: str | None = None, vocab_size: int | None = None,
                   tokenizer: str | Path | None = None, seq_length: int | None = None, overwrite: bool = False) -> Path:
    src = Path(src)
    if not (src / "weights").is_dir() or not (src / "context").is_dir():
        raise ConversionError(f"{src} is not a NeMo 2 checkpoint folder (needs weights/ and context/)")
    yaml_file = src / "context" / "model.yaml"
    if not yaml_file.is_file():
        raise ConversionError(f"{src}: context/model.yaml is missing; it is needed to know the model's shape")
    doc = yaml.safe_load(yaml_file.read_text()) or {}
    target = str(doc.get("_target_", ""))
    if "gpt" not in target.lower() and "llama" not in target.lower():
        raise ConversionError(f"unsupported architecture {target!r} in {yaml_file}: only GPT/Llama models convert")
    model, cfg_vocab, seq = model_config_from_nemo2(doc.get("config") or {}, str(yaml_file))
    tok_dir = Path(tokenizer) if tokenizer else _nemo2_tokenizer_dir(src)
    out = Path(out).absolute()
    with atomic_output(out, overwrite) as tmp, inference.megatron_session():
        reader = mcore.DistCheckpointReader(src / "weights")
        rows = reader.global_shape("embedding.word_embeddings.weight")[0]
        vocab = _vocab_size(vocab_size, cfg_vocab, tok_dir, rows)
        tdtype = _target_dtype(dtype, reader.dtype("embedding.word_embeddings.weight"))
        info(f"{src}: NeMo 2 {target.rsplit('.', 1)[-1]}, {model.num_layers} layers, vocab {vocab}, prefix {reader.prefix!r}")
        _write_mcore(tmp, out, model, vocab, int(seq_length or seq), tdtype, reader.tensors(model, vocab, "nemo2 -> mcore"),
                     tok_dir, {"kind": "nemo2", "path": str(src.absolute())})
    info(f"wrote {out}")
    return out


def _nemo2_tokenizer_dir(src: Path) -> Path | None:
    for c in (src / "context" / "nemo_tokenizer", src / "context" / "tokenizer", src / "context"):
        if tokenizer_files(c):
            return c
    return None


def _add_legacy_common(weights: Path) -> None:
    """The separate common.pt that Megatron-Core up to 0.14 (NeMo 2.5) needs; 0.19 keeps it inside the DCP files."""
    torch.save({"content_metadata": None}, weights / "common.pt")
    meta_file = weights / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta.update(common_backend="torch", common_backend_version=1)
    meta_file.write_text(json.dumps(meta))


def mcore_to_nemo2(src: str | Path, out: str | Path, *, dtype: str | None = None, overwrite: bool = False) -> Path:
    ckpt, meta = inference.read_checkpoint(src)
    model = inference.model_config_from_meta(meta)
    vocab = int(meta["vocab_size"])
    seq = int(meta["seq_length"])
    out = Path(out).absolute()
    with atomic_output(out, overwrite) as tmp, inference.megatron_session():
        reader = mcore.DistCheckpointReader(ckpt, prefix="")
        tdtype = inference.DTYPES[dtype] if dtype else reader.dtype("embedding.word_embeddings.weight")
        gpt = mcore.build_tp1_model(model, vocab, seq, tdtype)
        mcore.fill_model(gpt, ((n, t.to(tdtype)) for n, t in reader.tensors(model, vocab, "mcore -> nemo2")),
                         model, vocab, "filling")
        mcore.save_model(gpt, tmp / "weights", prefix=NEMO2_PREFIX)
        del gpt
        _add_legacy_common(tmp / "weights")
        ctx = tmp / "context"
        ctx.mkdir()
        context = nemo_context.trainer_context(nemo_context.llama_config(model, vocab, seq, tdtype))
        (ctx / "io.json").write_text(json.dumps(nemo_context.io_json(context), indent=2))
        (ctx / "model.yaml").write_text(yaml.safe_dump(nemo_context.model_yaml(context), sort_keys=False))
        copy_tokenizer(inference.checkpoint_tokenizer(ckpt, meta), ctx / nemo_context.TOKENIZER_DIR)
        (ctx / "prolong_source.json").write_text(json.dumps({"converted_from": str(ckpt)}, indent=2))
    info(f"wrote {out} (NeMo 2: weights/ + context/io.json, model.yaml, {nemo_context.TOKENIZER_DIR}/)")
    return out


# ---------------------------------------------------------------------------- NeMo 1 .nemo
def check_tar_members(tar: tarfile.TarFile, where: str) -> list[tarfile.TarInfo]:
    """Refuse members that would land outside the extraction folder or are not plain files/folders."""
    members = tar.getmembers()
    for m in members:
        p = PurePosixPath(m.name)
        if m.name.startswith(("/", "\\")) or p.is_absolute() or (len(m.name) > 1 and m.name[1] == ":"):
            raise ConversionError(f"unsafe tarball {where}: member {m.name!r} has an absolute path")
        if ".." in p.parts or ".." in PurePosixPath(m.name.replace("\\", "/")).parts:
            raise ConversionError(f"unsafe tarball {where}: member {m.name!r} leaves the extraction folder ('..')")
        if m.issym() or m.islnk():
            raise ConversionError(f"unsafe tarball {where}: member {m.name!r} is a link (to {m.linkname!r})")
        if not (m.isfile() or m.isdir()):
            raise ConversionError(f"unsafe tarball {where}: member {m.name!r} is not a regular file or folder")
    return members


def safe_extract(tar_path: Path, dest: Path) -> None:
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise ConversionError(f"{tar_path} is not a .nemo tarball: {err}") from err
    with tar:
        members = check_tar_members(tar, str(tar_path))
        tar.extractall(dest, members=members, filter="data")


def _find(root: Path, name: str) -> Path | None:
    hits = sorted(root.rglob(name), key=lambda p: len(p.parts))
    return hits[0] if hits else None


def load_pickled_state(path: Path) -> dict:
    """A pickled state dict through the weights-only loader (TE's BytesIO extra state allowed)."""
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConversionError(
            f"{path} cannot be loaded with PyTorch's weights-only loader ({err}); refusing to unpickle arbitrary objects"
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path} does not hold a state dict")
    return state


def nemo1_to_mcore(src: str | Path, out: str | Path, *, dtype: str | None = None, vocab_size: int | None = None,
                   tokenizer: str | Path | None = None, seq_length: int | None = None, overwrite: bool = False) -> Path:
    src = Path(src)
    if not src.is_file():
        raise ConversionError(f"{src} is not a .nemo file")
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nemo-extract-", dir=out.parent) as scratch:
        root = Path(scratch)
        safe_extract(src, root)
        cfg_file = _find(root, "model_config.yaml")
        if cfg_file is None:
            raise ConversionError(f"{src} has no model_config.yaml; not a NeMo 1 checkpoint")
        base = cfg_file.parent
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        model, cfg_vocab, seq = model_config_from_nemo1(cfg, f"{src}:model_config.yaml")
        tok_dir = Path(tokenizer) if tokenizer else (base if tokenizer_files(base) else None)
        if any(p.name.startswith(("mp_rank_", "tp_rank_")) for p in base.iterdir()):
            raise ConversionError(
                f"{src} holds model-parallel partitions (mp_rank_*/tp_rank_*); merge them to one partition with "
                "NeMo first, or save it with distributed (sharded) weights"
            )
        with atomic_output(out, overwrite) as tmp, inference.megatron_session():
            if (base / "model_weights").is_dir():
                reader = mcore.DistCheckpointReader(base / "model_weights")
                rows = reader.global_shape("embedding.word_embeddings.weight")[0]
                vocab = _vocab_size(vocab_size, cfg_vocab, tok_dir, rows)
                tdtype = _target_dtype(dtype, reader.dtype("embedding.word_embeddings.weight"))
                stream = reader.tensors(model, vocab, "nemo1 -> mcore")
            elif (base / "model_weights.ckpt").is_file():
                state = StateDictReader(load_pickled_state(base / "model_weights.ckpt"), NEMO1_PREFIX, str(src))
                vocab = _vocab_size(vocab_size, cfg_vocab, tok_dir, state.rows())
                tdtype = _target_dtype(dtype, state.state["embedding.word_embeddings.weight"].dtype)
                stream = state.tensors(model, vocab)
            else:
                raise ConversionError(f"{src} has neither model_weights/ nor model_weights.ckpt")
            info(f"{src}: NeMo 1, {model.num_layers} layers, vocab {vocab}")
            _write_mcore(tmp, out, model, vocab, int(seq_length or seq), tdtype, stream, tok_dir,
                         {"kind": "nemo1", "path": str(src.absolute())})
    info(f"wrote {out}")
    return out


__all__ = ["nemo2_to_mcore", "mcore_to_nemo2", "nemo1_to_mcore", "safe_extract", "check_tar_members"]
