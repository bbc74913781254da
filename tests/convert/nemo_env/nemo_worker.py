"""NeMo's own code, driven by the tests: run with the NeMo test environment's python (.venv-nemo).

One process per test session (importing NeMo takes about a minute): it reads one JSON request a
line on stdin and answers one JSON line on the stdout it was started with (NeMo's own printing goes
to stderr). Requests::

    {"op": "import_hf", "src": HF_DIR, "out": NEMO2_DIR}     HF -> NeMo 2 through HFLlamaImporter
    {"op": "load_context", "path": NEMO2_DIR}                io.load_context(path / "context", "model")
    {"op": "export_hf", "path": NEMO2_DIR, "out": HF_DIR}    NeMo 2 -> HF through io.export_ckpt
    {"op": "quit"}

Each request may carry "te_shim": false to run without the CPU settings below, or
"local_norms": false to keep NeMo's TE norm names (see LOCAL_NORMS below). Answers are
{"ok": ...} or {"error": exception type, "message": NeMo's message}.

NeMo 2.5 on a machine without a GPU or Transformer Engine needs, besides the pins of
constraints.txt, exactly these settings (``te_shim``):
- Llama configs default to TE-only features (``apply_rope_fusion``, ``persist_layer_norm``) whose
  __post_init__ check raises without TE: they are switched off on each config object before that
  check; the recorded constructor arguments (context/io.json) stay what NeMo writes on a GPU.
- Megatron-Core 0.14's distributed-checkpoint writer calls torch.cuda.synchronize() and
  torch.cuda.current_device(), NeMo's model wrapper sets up DDP on a torch.cuda.Stream(), NeMo's
  checkpoint loader asserts CUDA is initialised to move tensors to the current GPU: on a CPU-only
  torch these are no-ops / the CPU.
- Without TE, Megatron builds Llama layers from its local spec, whose RMSNorms are modules of
  their own (``input_layernorm``, ``pre_mlp_layernorm``; saved under TE's fused names through the
  layer's sharded_state_dict_keys_map). NeMo's HF importer and exporter map TE's names
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) and, finding no such
  parameter, skip the norms without an error: NeMo's own import leaves every RMSNorm at 1.0 and the
  export fails. The state-dict mappings are given the local names (``LOCAL_NORMS``).
- The importer's checkpoint save is asynchronous by default (a CUDA path): the importer runs with
  MegatronStrategy(ckpt_async_save=False).
And one rule that is no setting: the writer starts a multiprocessing manager with the ``spawn``
method, which re-imports the main script, so NeMo must only be imported under
``if __name__ == "__main__"`` (else the child re-runs the import and waits forever for the lock
the parent holds: the "importer stall").
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

TE_OFF = ("apply_rope_fusion", "persist_layer_norm")
LOCAL_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def _local(key: str) -> str:
    for te, local in LOCAL_NORMS.items():
        key = key.replace(te, local)
    return key


@contextlib.contextmanager
def cpu_settings(enabled: bool, local_norms: bool = True):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    original = TransformerConfig.__post_init__

    def post_init(self):
        for name in TE_OFF:
            setattr(self, name, False)
        original(self)

    patches = [(TransformerConfig, "__post_init__", post_init),
               (torch.cuda, "synchronize", lambda *a, **k: None),
               (torch.cuda, "current_device", lambda: torch.device("cpu")),
               (torch.cuda, "Stream", lambda *a, **k: None),
               (torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())]
    from nemo.lightning import io
    from nemo.lightning.io import pl

    original_transforms = io.apply_transforms

    def apply_transforms(source, target, mapping, *args, **kwargs):
        return original_transforms(source, target, {_local(k): _local(v) for k, v in mapping.items()}, *args, **kwargs)

    patches.append((pl, "_fix_tensors_device", lambda ckpt: ckpt))
    if local_norms:
        patches.append((io, "apply_transforms", apply_transforms))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, fn in patches if enabled else []:
        setattr(obj, name, fn)
    try:
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def import_hf(src: str, out: str) -> str:
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter

    class Importer(HFLlamaImporter):
        def nemo_setup(self, model, trainer=None, *args, **kwargs):
            return super().nemo_setup(model, trainer, *args, ckpt_async_save=False, **kwargs)

    return str(Importer(src)(output_path=Path(out)))


CONFIG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "seq_length", "vocab_size", "make_vocab_size_divisible_by", "rotary_base", "rotary_percent",
    "seq_len_interpolation_factor", "scale_factor", "low_freq_factor", "high_freq_factor", "old_context_len",
    "layernorm_epsilon", "normalization", "gated_linear_unit", "position_embedding_type", "add_bias_linear",
    "share_embeddings_and_output_weights", "init_method_std", "bf16",
)


def load_context(path: str) -> dict:
    from nemo.lightning import io

    model = io.load_context(Path(path) / "context", subpath="model")
    cfg = model.config
    fields = {k: getattr(cfg, k) for k in CONFIG_FIELDS if hasattr(cfg, k)}
    fields["activation_func"] = getattr(cfg.activation_func, "__name__", str(cfg.activation_func))
    fields["params_dtype"] = str(cfg.params_dtype)
    tok = model.tokenizer
    return {"model": f"{type(model).__module__}.{type(model).__name__}",
            "config_class": f"{type(cfg).__module__}.{type(cfg).__name__}", "config": fields,
            "tokenizer": {"class": type(tok).__name__, "vocab_size": tok.vocab_size,
                          "ids": tok.text_to_ids("w3 w4 w299")}}


def export_hf(path: str, out: str) -> str:
    from nemo.lightning import io

    return str(io.export_ckpt(Path(path), "hf", output_path=Path(out)))


OPS = {"import_hf": lambda r: import_hf(r["src"], r["out"]), "load_context": lambda r: load_context(r["path"]),
       "export_hf": lambda r: export_hf(r["path"], r["out"])}


def serve() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # NeMo's prints, Python's and C's, go to stderr
    sys.stdout = sys.stderr
    answers.write(json.dumps({"ok": "ready"}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            with cpu_settings(req.get("te_shim", True), req.get("local_norms", True)):
                answer = {"ok": OPS[req["op"]](req)}
        except Exception as err:  # the test reads NeMo's own message; the traceback goes to stderr
            traceback.print_exc()
            answer = {"error": type(err).__name__, "message": str(err)}
        answers.write(json.dumps(answer, default=str) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # megatron-core builds no CUDA extension at import
    with cpu_settings(True):
        import nemo.collections.llm  # noqa: F401  (import once, before the first request)
    serve()
