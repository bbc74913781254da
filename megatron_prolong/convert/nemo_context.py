"""The ``context/`` of a NeMo 2 checkpoint for a Llama: model.yaml and the fiddle io.json NeMo loads.

NeMo's ``io.load_context`` rebuilds the model from ``context/io.json``: fiddle's JSON serialisation
of ``TrainerContext(model=LlamaModel(config=LlamaConfig(...), tokenizer=AutoTokenizer(...)),
trainer=Trainer(...), extra={})``. It is written here without fiddle or NeMo installed, with the
constructor arguments NeMo's own HF importer (``HFLlamaImporter``) records for the same model, so a
NeMo user gets NeMo's defaults for everything else (on a GPU with Transformer Engine: its fusions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_prolong.config import ModelConfig

LLAMA = "nemo.collections.llm.gpt.model.llama"
TOKENIZER = "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer"
TOKENIZER_DIR = "nemo_tokenizer"  # context/nemo_tokenizer/, where NeMo's importer puts the HF tokenizer
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "old_context_len": 8192}  # fixed in Megatron


@dataclass(frozen=True)
class Ref:
    """A Python object named by module and attribute (a fiddle ``pyref``): a class, dtype or function."""

    target: str


@dataclass(frozen=True)
class Call:
    """``target(**args)`` (a ``fdl.Config``)."""

    target: str
    args: dict


def llama_config(model: ModelConfig, vocab_size: int, seq_length: int, dtype: torch.dtype) -> Call:
    """The LlamaConfig / Llama31Config call NeMo's HF importer makes for this model."""
    args = {
        "num_layers": model.num_layers, "hidden_size": model.hidden_size, "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads, "num_query_groups": model.num_query_groups,
        "kv_channels": model.hidden_size // model.num_attention_heads, "init_method_std": model.init_method_std,
        "layernorm_epsilon": model.norm_epsilon, "gated_linear_unit": True,
        "share_embeddings_and_output_weights": not model.untie_embeddings,
        "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by, "rotary_base": float(model.rope_base),
        "seq_length": seq_length, "vocab_size": vocab_size,
        "fp16": dtype == torch.float16, "bf16": dtype == torch.bfloat16, "params_dtype": Ref(str(dtype)),
    }
    if model.rope_interpolation_factor is not None:
        args["seq_len_interpolation_factor"] = float(model.rope_interpolation_factor)
    if model.rope_scaling == "llama3":
        return Call(f"{LLAMA}.Llama31Config", {**args, "scale_factor": float(model.rope_scaling_factor), **LLAMA3_ROPE})
    return Call(f"{LLAMA}.LlamaConfig", args)


def trainer_context(config: Call) -> Call:
    model = Call(f"{LLAMA}.LlamaModel", {"config": config,
                                         "tokenizer": Call(TOKENIZER, {"pretrained_model_name": TOKENIZER_DIR})})
    strategy = Call("nemo.lightning.pytorch.strategies.megatron_strategy.MegatronStrategy",
                    {"ckpt_save_optimizer": False})
    trainer = Call("nemo.lightning.pytorch.trainer.Trainer", {"accelerator": "cpu", "devices": 1, "strategy": strategy})
    return Call("nemo.lightning.io.pl.TrainerContext", {"model": model, "trainer": trainer, "extra": {}})


# ---------------------------------------------------------------------------- model.yaml
def _yaml_value(v):
    if isinstance(v, Ref):
        return {"_target_": v.target, "_call_": False}
    if isinstance(v, Call):
        return {"_target_": v.target, **{k: _yaml_value(x) for k, x in v.args.items()}}
    return v


def model_yaml(context: Call) -> dict:
    """context/model.yaml: the model call, as NeMo's ``io_dump(yaml_attrs=["model"])`` writes it."""
    return _yaml_value(context.args["model"])


# ---------------------------------------------------------------------------- io.json (fiddle JSON)
def _pyref(target: str) -> dict:
    module, name = target.rsplit(".", 1)
    return {"type": "pyref", "module": module, "name": name}


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class _Writer:
    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}

    def _add(self, stem: str, obj: dict) -> dict:
        n = 1 + sum(k.rsplit("_", 1)[0] == stem for k in self.objects)
        key = f"{stem}_{n}"
        self.objects[key] = obj
        return {"type": "ref", "key": key}

    def _tuple(self, names: list[str]) -> dict:
        return self._add("tuple", {"type": _pyref("builtins.tuple"),
                                   "items": [[f"Index(index={i})", n] for i, n in enumerate(names)], "metadata": None})

    def _dict(self, items: dict, path: str | None) -> dict:
        obj = {"type": _pyref("builtins.dict"),
               "items": [[f"Key(key={k!r})", self.value(v, f"{path}[{k!r}]")] for k, v in items.items()],
               "metadata": self._tuple(list(items)) if items else {"type": _pyref("builtins.tuple"), "items": [],
                                                                    "metadata": None}}
        if path is not None:
            obj["paths"] = [path]
        return self._add("dict", obj)

    def value(self, v, path: str):
        if isinstance(v, Call):
            return self.call(v, path)
        if isinstance(v, Ref):
            return {**_pyref(v.target), "paths": [path]}
        if isinstance(v, dict):
            return self._dict(v, path)
        return {"type": "leaf", "value": v, "paths": [path]}

    def call(self, c: Call, path: str) -> dict:
        items = [[f"Attr(name={k!r})", self.value(v, f"{path}.{k}")] for k, v in c.args.items()]
        meta = self._add("buildable_traverser_metadata", {
            "type": _pyref("fiddle._src.config.BuildableTraverserMetadata"),
            "items": [["Attr(name='fn_or_cls')", _pyref(c.target)],
                      ["Attr(name='argument_names')", self._tuple(list(c.args))],
                      ["Attr(name='argument_tags')", self._dict({}, None)],
                      ["Attr(name='argument_history')", self._dict({}, None)]],
            "metadata": _pyref("fiddle._src.config.BuildableTraverserMetadata")})
        return self._add(_snake(c.target.rsplit(".", 1)[1]), {"type": _pyref("fiddle._src.config.Config"),
                                                               "items": items, "metadata": meta, "paths": [path]})


def io_json(context: Call) -> dict:
    """fiddle's ``serialization.dump_json`` layout of ``context`` (what ``io.load_context`` reads)."""
    w = _Writer()
    root = w.call(context, "<root>")
    return {"root": root, "objects": w.objects, "refcounts": {k: 1 for k in w.objects}, "version": "0.0.1"}
