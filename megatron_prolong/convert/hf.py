"""Hugging Face Llama (safetensors) <-> the trainer's Megatron distributed checkpoints: the
config.json / generation_config.json side and the two commands.

hf-to-mcore reads the safetensors lazily (one tensor at a time through ``safe_open``) into the
TP=1 GPTModel, then saves it; mcore-to-hf reads the checkpoint one tensor kind at a time and
writes safetensors shards as they fill (:mod:`megatron_prolong.convert.safetensors_io`). Neither
direction holds two full copies of the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_prolong import inference
from megatron_prolong.config import ModelConfig
from megatron_prolong.convert.common import atomic_output, copy_tokenizer, info, warn
from megatron_prolong.convert.mapping import ConversionError, entries
from megatron_prolong.convert.safetensors_io import SafetensorsReader, hf_tensors, parse_size, write_hf
from megatron_prolong.tokenizer import ByteTokenizer, TokenizerConfig, as_id_list, checkpoint_record, unique_ids

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# What Megatron's RotaryEmbedding hard-codes for Llama-3.1 scaling.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


# ---------------------------------------------------------------------------- config
def read_hf_config(path: Path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{cfg_file} is not valid JSON: {err}") from err


def rope_of(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    scaling = cfg.get("rope_scaling")
    if isinstance(params, dict):  # transformers 5.x layout
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if theta is None:
        warn("config.json gives no rope_theta (or rope_parameters.rope_theta); using transformers' default 10000")
        theta = 10000.0
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def model_config_from_hf(cfg: dict, rope_base: float | None = None) -> tuple[ModelConfig, int, int]:
    """(ModelConfig, vocab_size, max_position_embeddings); refuses what the trainer's model cannot express."""
    archs = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and not (not archs and cfg.get("model_type") == "llama"):
        raise ConversionError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}: only {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama 3 / 3.1 / 3.2 shapes) can be converted"
        )
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if key in cfg and cfg[key] != ok:
            raise ConversionError(f"unsupported Llama variant: {key}={cfg[key]!r} (the trainer's model needs {ok!r})")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ConversionError(
            f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; the trainer's model "
            "derives the head size from hidden_size / heads"
        )
    theta, scaling = rope_of(cfg)
    kind, factor, interp = "none", 8.0, None
    if scaling is not None:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype == "llama3":
            for k, v in LLAMA3_FIXED.items():
                if k in scaling and float(scaling[k]) != v:
                    raise ConversionError(
                        f"rope_scaling.{k}={scaling[k]} is not supported: Megatron's Llama-3.1 RoPE scaling "
                        f"fixes it at {v}"
                    )
            kind, factor = "llama3", float(scaling["factor"])
        elif rtype == "linear":
            interp = float(scaling["factor"])
        else:
            raise ConversionError(f"RoPE scaling type {rtype!r} is not supported (llama3 and linear are)")
    model = ModelConfig(
        name=str(cfg.get("_name_or_path") or "converted") or "converted",
        num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]), num_attention_heads=heads, num_query_groups=groups,
        vocab_size=int(cfg["vocab_size"]), norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        untie_embeddings=not bool(cfg.get("tie_word_embeddings", False)),
        rope_base=float(rope_base) if rope_base is not None else theta,
        rope_scaling=kind, rope_scaling_factor=factor, rope_interpolation_factor=interp,
        attention_backend="auto",
    )
    if heads % groups:
        raise ConversionError(f"num_attention_heads={heads} is not divisible by num_key_value_heads={groups}")
    return model, int(cfg["vocab_size"]), int(cfg.get("max_position_embeddings", 8192))


def check_rope_matches(model: ModelConfig, vocab_size: int, max_pos: int) -> None:
    """Megatron's inverse frequencies must equal those transformers computes for the same settings."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if model.rope_interpolation_factor is not None:
        return  # linear interpolation scales positions, not frequencies (checked through logits in tests)
    hf = LlamaConfig(**hf_config_for(model, vocab_size, max(max_pos, 16384), torch.float32))
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    hf_inv, _ = ROPE_INIT_FUNCTIONS[params.get("rope_type", "default")](hf, "cpu") if params.get(
        "rope_type", "default") != "default" else _default_inv_freq(hf)
    mc_inv = RotaryEmbedding(
        kv_channels=model.hidden_size // model.num_attention_heads, rotary_percent=1.0, rotary_base=model.rope_base,
        rope_scaling=model.rope_scaling == "llama3", rope_scaling_factor=model.rope_scaling_factor,
        use_cpu_initialization=True,
    ).inv_freq
    if not torch.allclose(hf_inv.float(), mc_inv.float(), rtol=1e-5, atol=0):
        raise ConversionError(
            "the RoPE frequencies Megatron would use differ from those transformers computes "
            f"(rope_base {model.rope_base:g}, scaling {model.rope_scaling}); this RoPE variant is not supported"
        )


def _default_inv_freq(hf) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if "default" in ROPE_INIT_FUNCTIONS:
        return ROPE_INIT_FUNCTIONS["default"](hf, "cpu")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding.compute_default_rope_parameters(hf, "cpu")


def hf_config_for(model: ModelConfig, vocab_size: int, seq_length: int, dtype: torch.dtype,
                  base: dict | None = None, token_ids: dict | None = None) -> dict:
    """config.json for the checkpoint, in the layout the installed transformers reads back.

    ``token_ids`` (a tokenizer record's bos/eos/pad) are written explicitly, unknown ones as null:
    left out, transformers would read its defaults 1 and 2, which stop nothing in a Llama-3 vocabulary.
    """
    from transformers import LlamaConfig

    kept = {k: base[k] for k in ("initializer_range", "pretraining_tp", "use_cache") if base and k in base}
    if token_ids is not None:
        eos = token_ids.get("eos_token_id") or []
        kept.update(bos_token_id=token_ids.get("bos_token_id"), pad_token_id=token_ids.get("pad_token_id"),
                    eos_token_id=(eos[0] if len(eos) == 1 else eos) or None)
    fields = dict(
        kept, architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, head_dim=model.hidden_size // model.num_attention_heads,
        hidden_act="silu", attention_bias=False, mlp_bias=False, rms_norm_eps=model.norm_epsilon,
        max_position_embeddings=seq_length, tie_word_embeddings=not model.untie_embeddings,
    )
    if model.rope_scaling == "llama3" and model.rope_interpolation_factor is not None:
        raise ConversionError("llama3 RoPE scaling together with linear interpolation has no Hugging Face equivalent")
    scaling = None
    if model.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_FIXED}
    elif model.rope_interpolation_factor is not None:
        scaling = {"rope_type": "linear", "factor": model.rope_interpolation_factor}
    if transformers_major() >= 5:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": model.rope_base, **(scaling or {})}
    else:
        fields["rope_theta"] = model.rope_base
        fields["rope_scaling"] = scaling
    fields["torch_dtype" if transformers_major() < 5 else "dtype"] = str(dtype).removeprefix("torch.")
    cfg = LlamaConfig(**fields).to_diff_dict()  # what save_pretrained writes
    cfg.pop("_name_or_path", None)
    return cfg


def source_token_ids(cfg: dict, folder: Path) -> dict:
    """bos/eos/pad ids a Hugging Face model folder states (generation_config.json, then config.json)."""
    gen_file = Path(folder) / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    return {
        "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id")),
        "eos_token_id": unique_ids(as_id_list(gen.get("eos_token_id")) + as_id_list(cfg.get("eos_token_id"))),
        "pad_token_id": gen.get("pad_token_id", cfg.get("pad_token_id")),
    }


def export_tokenizer(ckpt: Path, meta: dict, tokenizer: str | Path | None) -> dict:
    """The tokenizer record an export uses: ``--tokenizer DIR``, else the checkpoint's own record;
    for checkpoints written before records carried ids, one rebuilt from what the checkpoint has."""
    from megatron_prolong.convert import mcore

    if tokenizer:
        return mcore.folder_record(Path(tokenizer), str(tokenizer))
    record = dict(meta.get("tokenizer") or {})
    if "eos_token_id" in record:
        return record
    if record.get("kind") == "byte":
        return checkpoint_record(TokenizerConfig(kind="byte"))
    ids = source_token_ids(json.loads((ckpt / "hf_config.json").read_text()), ckpt) \
        if (ckpt / "hf_config.json").is_file() else None
    return mcore.folder_record(inference.checkpoint_tokenizer(ckpt, meta), record.get("path"), ids)


def write_generation_config(out: Path, record: dict, base: Path | None) -> None:
    """generation_config.json with every end-of-generation id (``base``'s sampling settings kept)."""
    from transformers import GenerationConfig

    settings = json.loads(base.read_text()) if base is not None and base.is_file() else {}
    settings.pop("transformers_version", None)
    settings.update(bos_token_id=record.get("bos_token_id"), eos_token_id=record["eos_token_id"],
                    pad_token_id=record.get("pad_token_id"))
    GenerationConfig(**{k: v for k, v in settings.items() if v is not None}).save_pretrained(out)


# ---------------------------------------------------------------------------- commands
def hf_to_mcore(src: str | Path, out: str | Path, *, rope_base: float | None = None, seq_length: int | None = None,
                dtype: str | None = None, tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    from megatron_prolong.convert import mcore

    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder")
    cfg = read_hf_config(src)
    model, vocab_size, max_pos = model_config_from_hf(cfg, rope_base)
    check_rope_matches(model, vocab_size, max_pos)
    reader = SafetensorsReader(src)
    src_dtype = reader.get(entries(model)[0].hf[0]).dtype
    tdtype = inference.DTYPES[dtype] if dtype else (torch.bfloat16 if src_dtype == torch.bfloat16 else torch.float32)
    seq = int(seq_length) if seq_length else max_pos
    out = Path(out).absolute()
    with atomic_output(out, overwrite) as tmp, inference.megatron_session():
        info(f"{src}: {model.num_layers} layers, hidden {model.hidden_size}, vocab {vocab_size}, "
             f"rope base {model.rope_base:g}{' (overridden)' if rope_base is not None else ''}, "
             f"seq_length {seq}, {tdtype}")
        gpt = mcore.build_tp1_model(model, vocab_size, seq, tdtype)
        mcore.fill_model(gpt, hf_tensors(reader, model, vocab_size, tdtype), model, vocab_size, "hf -> mcore")
        mcore.save_model(gpt, tmp)
        del gpt
        has_tok = copy_tokenizer(tokenizer or src, tmp / "tokenizer")
        (tmp / "hf_config.json").write_text(json.dumps(cfg, indent=2))
        if (src / "generation_config.json").is_file():
            # Also beside the tokenizer: a run with tokenizer.path=OUT/tokenizer then records the same EOS ids.
            for dst in (tmp, *([tmp / "tokenizer"] if has_tok else [])):
                shutil.copy2(src / "generation_config.json", dst / "generation_config.json")
        meta = mcore.write_meta(tmp, model, vocab_size, seq, str(out / "tokenizer") if has_tok else None,
                                {"kind": "hf", "path": str(src.absolute())}, source_token_ids(cfg, src))
        (tmp / "train_overrides.txt").write_text(" ".join(mcore.trainer_overrides(meta, out)) + "\n")
    info(f"wrote {out}")
    return out


def mcore_to_hf(src: str | Path, out: str | Path, *, dtype: str | None = None, seq_length: int | None = None,
                max_shard_size: str | int = "5GB", tokenizer: str | Path | None = None,
                overwrite: bool = False) -> Path:
    from megatron_prolong.convert import mcore

    ckpt, meta = inference.read_checkpoint(src)
    model = inference.model_config_from_meta(meta)
    vocab_size = int(meta["vocab_size"])
    seq = int(seq_length or meta["seq_length"])
    out = Path(out).absolute()
    with atomic_output(out, overwrite) as tmp, inference.megatron_session():
        reader = mcore.DistCheckpointReader(ckpt, prefix="")
        tdtype = inference.DTYPES[dtype] if dtype else reader.dtype(entries(model)[0].ckpt_key)
        write_hf(tmp, reader.tensors(model, vocab_size, "mcore -> hf"), model, vocab_size, tdtype,
                 parse_size(max_shard_size), "writing safetensors")
        base = None
        if (ckpt / "hf_config.json").is_file():
            base = json.loads((ckpt / "hf_config.json").read_text())
        record = export_tokenizer(ckpt, meta, tokenizer)
        cfg = hf_config_for(model, vocab_size, seq, tdtype, base, record)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if record["eos_token_id"]:
            write_generation_config(tmp, record, ckpt / "generation_config.json")
        else:
            warn("the checkpoint records no end-of-sequence id: generate() will run to max_new_tokens; "
                 "pass --tokenizer DIR (a Hugging Face tokenizer folder) to set one")
        if tokenizer:
            copy_tokenizer(tokenizer, tmp)
        elif record.get("kind") == "byte":
            ByteTokenizer().save_pretrained(tmp)
        else:
            copy_tokenizer(inference.checkpoint_tokenizer(ckpt, meta), tmp)
    info(f"wrote {out} (rope_theta {model.rope_base:g}, max_position_embeddings {seq}, bos "
         f"{record.get('bos_token_id')}, eos {record['eos_token_id']})")
    return out
