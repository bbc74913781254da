"""NeMo 2 both ways through NeMo's own code, NeMo 1 .nemo tarballs to Megatron, untrusted files.

NeMo 2.5.3 (the last release with nemo.collections.llm) runs from its own pinned environment,
.venv-nemo (tests/convert/nemo_env/setup.sh, started in the background by the test session when
these tests are selected, and waited for by the fixture below), in one subprocess per module
(tests/convert/nemo_env/nemo_worker.py): its HF importer writes the NeMo 2 fixtures, its
``io.load_context`` opens what ``mcore-to-nemo`` writes and its HF exporter turns that back into a
Hugging Face folder.

NeMo 1 stays one way (NeMo 1 -> Megatron) and its fixtures are built here from NeMo 1's documented
layout (``model_config.yaml`` + ``model_weights.ckpt`` with keys ``model.decoder.layers.N...``,
TE norm names and ``_extra_state`` entries, or ``model_weights/`` as a distributed checkpoint with
keys prefixed ``model.``): NeMo 1's writer (``MegatronGPTModel.save_to`` in nemo.collections.nlp)
is not part of the NeMo 2.5 environment (no nlp extra, no Apex/TE), so no NeMo 1 file here is
written by NeMo.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from convert_helpers import hf_state, make_hf_llama

from megatron_prolong.convert import ConversionError
from megatron_prolong.convert.hf import hf_to_mcore, mcore_to_hf
from megatron_prolong.convert.mcore import DistCheckpointReader
from megatron_prolong.inference import megatron_session, model_config_from_meta, read_checkpoint
from megatron_prolong.convert.nemo import mcore_to_nemo2, nemo1_to_mcore, nemo2_to_mcore

REPO = Path(__file__).resolve().parents[2]
NEMO_ENV = REPO / "tests" / "convert" / "nemo_env"
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _all_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    c, meta = read_checkpoint(ckpt)
    with megatron_session():
        reader = DistCheckpointReader(c, prefix="")
        return {k: t.clone() for k, t in reader.tensors(model_config_from_meta(meta), meta["vocab_size"])}


def _assert_same_hf(a: Path, b: Path) -> None:
    x, y = hf_state(a), hf_state(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


def _assert_same_mcore(a: Path, b: Path) -> None:
    x, y = _all_tensors(a), _all_tensors(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


# ---------------------------------------------------------------------------- NeMo itself
class NeMo:
    """NeMo's code in the NeMo environment: one worker process, one JSON request a line."""

    def __init__(self, log: Path) -> None:
        venv = Path(os.environ.get("NEMO_VENV", REPO / ".venv-nemo"))
        setup = subprocess.run(["bash", str(NEMO_ENV / "setup.sh")], capture_output=True, text=True,
                               env={**os.environ, "NEMO_VENV": str(venv)})
        assert setup.returncode == 0, f"creating the NeMo test environment failed:\n{setup.stderr[-4000:]}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), str(NEMO_ENV / "nemo_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                                     text=True, env={**env, "OMP_NUM_THREADS": "1"})
        assert self._read() == {"ok": "ready"}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the NeMo worker died:\n{self.log.read_text()[-4000:]}"
        return json.loads(line)

    def __call__(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **{k: str(v) if isinstance(v, Path) else v
                                                        for k, v in args.items()}}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def ok(self, op: str, **args):
        answer = self(op, **args)
        assert "ok" in answer, f"NeMo {op} failed: {answer}\n{self.log.read_text()[-4000:]}"
        return answer["ok"]

    def close(self) -> None:
        try:
            self.proc.communicate(json.dumps({"op": "quit"}) + "\n", timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def nemo(tmp_path_factory):
    worker = NeMo(tmp_path_factory.mktemp("nemo") / "worker.log")
    yield worker
    worker.close()


def _hf_for_nemo(folder: Path, **kw) -> Path:
    """A tiny random HF Llama as transformers 4.53 (NeMo's) writes it: ``torch_dtype`` in config.json."""
    make_hf_llama(folder, **kw)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = cfg.get("dtype", "float32")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="module")
def nemo_imported(nemo, tmp_path_factory):
    """HF (RoPE base 8e6, 16K positions) -> NeMo 2 through NeMo's HFLlamaImporter."""
    root = tmp_path_factory.mktemp("nemo_import")
    _hf_for_nemo(root / "hf", rope_theta=8e6, max_pos=16384)
    nemo.ok("import_hf", src=root / "hf", out=root / "nemo2")
    return root


def test_nemo_importer_checkpoint_to_mcore_is_exact(nemo_imported):
    root = nemo_imported
    nemo2_to_mcore(root / "nemo2", root / "mc")
    hf_to_mcore(root / "hf", root / "mc_ref")
    _assert_same_mcore(root / "mc_ref", root / "mc")
    _, meta = read_checkpoint(root / "mc")
    assert meta["model"]["rope_base"] == 8e6 and meta["model"]["rope_scaling"] == "none"
    assert meta["seq_length"] == 16384 and meta["vocab_size"] == 300
    assert meta["tokenizer"]["path"].endswith("mc/tokenizer")
    mcore_to_hf(root / "mc", root / "hf_back")
    _assert_same_hf(root / "hf", root / "hf_back")


def test_trainer_starts_from_nemo_written_checkpoint(nemo_imported, run_training):
    root = nemo_imported
    nemo2_to_mcore(root / "nemo2", root / "mc_train", seq_length=128)
    overrides = (root / "mc_train" / "train_overrides.txt").read_text().split()
    run = run_training(*overrides, "train.steps=1", "train.lr=1e-30", "train.precision=fp32", "data.seq_length=128",
                       "train.global_batch_size=1", "train.micro_batch_size=1", "log.tensorboard=false")
    assert "initialised from" in run.output and "model only" in run.output
    assert len(run.losses) == 1 and 0 < run.losses[0] < 20


def test_mcore_to_nemo_opens_in_nemo_and_nemo_exports_the_same_hf(nemo, tmp_path):
    _hf_for_nemo(tmp_path / "hf", rope_theta=8e6, max_pos=16384, rope_scaling=LLAMA31_ROPE)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    mcore_to_nemo2(tmp_path / "mc", tmp_path / "nemo2")
    ctx = tmp_path / "nemo2" / "context"
    assert {"io.json", "model.yaml", "nemo_tokenizer"} <= {p.name for p in ctx.iterdir()}

    got = nemo.ok("load_context", path=tmp_path / "nemo2")
    assert got["model"] == "nemo.collections.llm.gpt.model.llama.LlamaModel"
    assert got["config_class"] == "nemo.collections.llm.gpt.model.llama.Llama31Config"
    _, meta = read_checkpoint(tmp_path / "mc")
    m = meta["model"]
    want = {"num_layers": m["num_layers"], "hidden_size": m["hidden_size"], "ffn_hidden_size": m["ffn_hidden_size"],
            "num_attention_heads": m["num_attention_heads"], "num_query_groups": m["num_query_groups"],
            "kv_channels": 16, "rotary_base": 8e6, "scale_factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "old_context_len": 8192, "seq_len_interpolation_factor": None,
            "seq_length": 16384, "vocab_size": 300, "make_vocab_size_divisible_by": m["make_vocab_size_divisible_by"],
            "share_embeddings_and_output_weights": False, "layernorm_epsilon": 1e-5, "normalization": "RMSNorm",
            "gated_linear_unit": True, "position_embedding_type": "rope", "add_bias_linear": False,
            "activation_func": "silu", "params_dtype": "torch.float32"}
    assert {k: got["config"][k] for k in want} == want
    assert got["tokenizer"] == {"class": "AutoTokenizer", "vocab_size": 300, "ids": [3, 4, 299]}

    nemo.ok("export_hf", path=tmp_path / "nemo2", out=tmp_path / "hf_nemo")
    _assert_same_hf(tmp_path / "hf", tmp_path / "hf_nemo")
    cfg = json.loads((tmp_path / "hf_nemo" / "config.json").read_text())
    assert cfg["rope_theta"] == 8e6 and cfg["rope_scaling"] == LLAMA31_ROPE
    assert cfg["max_position_embeddings"] == 16384 and cfg["vocab_size"] == 300 and cfg["num_key_value_heads"] == 2
    assert (tmp_path / "hf_nemo" / "tokenizer.json").is_file()


def test_what_nemo_refuses_is_reported_with_nemos_message(nemo, tmp_path, mcore_ckpt):
    # A config.json from transformers >= 4.56 names the dtype "dtype"; NeMo 2.5 reads "torch_dtype".
    make_hf_llama(tmp_path / "hf")
    answer = nemo("import_hf", src=tmp_path / "hf", out=tmp_path / "n")
    assert answer == {"error": "ValueError", "message": "torch_dtype is not of type str/torch.dtype"}
    mcore_to_nemo2(mcore_ckpt, tmp_path / "nemo2")
    # Without Transformer Engine, NeMo's Llama defaults (rope fusion) do not build.
    answer = nemo("load_context", path=tmp_path / "nemo2", te_shim=False)
    assert answer["error"] == "ValueError"
    assert answer["message"].startswith("apply_rope_fusion is not available. Please install TE >= 1.4.")
    # A NeMo 2 folder without context/io.json (what mcore-to-nemo wrote before) is not a NeMo checkpoint to
    # NeMo (which, not finding context/io.json, looks for an older layout's io.json one folder up).
    (tmp_path / "nemo2" / "context" / "io.json").unlink()
    answer = nemo("load_context", path=tmp_path / "nemo2")
    assert answer == {"error": "FileNotFoundError", "message": f"No such file: '{tmp_path / 'nemo2' / 'io.json'}'"}


def test_nemo_import_without_te_norm_names_loses_the_norms(nemo, nemo_imported, tmp_path):
    """Why the worker maps NeMo's TE norm names to the local spec's: NeMo alone silently drops them."""
    nemo.ok("import_hf", src=nemo_imported / "hf", out=tmp_path / "nemo2", local_norms=False)
    nemo2_to_mcore(tmp_path / "nemo2", tmp_path / "mc")
    hf_to_mcore(nemo_imported / "hf", tmp_path / "ref")
    got, ref = _all_tensors(tmp_path / "mc"), _all_tensors(tmp_path / "ref")
    norms = [k for k in ref if k.endswith("layernorm.weight") and ".layers." in k]
    assert norms and all(torch.equal(got[k], torch.ones_like(got[k])) for k in norms)
    assert not any(torch.equal(ref[k], got[k]) for k in norms)


# ---------------------------------------------------------------------------- NeMo 1 (built here)
@pytest.fixture
def mcore_ckpt(tmp_path):
    make_hf_llama(tmp_path / "hf", rope_theta=8e6, max_pos=16384, rope_scaling=LLAMA31_ROPE)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    return tmp_path / "mc"


def _nemo1_config(meta: dict) -> dict:
    m = meta["model"]
    return {
        "mcore_gpt": True, "num_layers": m["num_layers"], "hidden_size": m["hidden_size"],
        "ffn_hidden_size": m["ffn_hidden_size"], "num_attention_heads": m["num_attention_heads"],
        "num_query_groups": m["num_query_groups"], "layernorm_epsilon": m["norm_epsilon"],
        "rotary_base": m["rope_base"], "share_embeddings_and_output_weights": not m["untie_embeddings"],
        "encoder_seq_length": 4096, "max_position_embeddings": 4096, "make_vocab_size_divisible_by": 128,
        "activation": "fast-swiglu", "normalization": "rmsnorm", "bias": False, "position_embedding_type": "rope",
        "tokenizer": {"library": "huggingface", "type": "meta-llama/Meta-Llama-3-8B"},
    }


def _tar(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        for p in sorted(folder.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(folder)), recursive=False)
    return out


def _nemo1_state(ckpt: Path, meta: dict) -> dict:
    """The unstacked NeMo 1 state dict: model. prefix, TE norm names, padded vocab, BytesIO extra state."""
    from megatron_prolong.model.builder import padded_vocab_size

    model = model_config_from_meta(meta)
    state = {}
    for name, t in _all_tensors(ckpt).items():
        name = name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        name = name.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            padded = torch.zeros(padded_vocab_size(t.shape[0], model, 1), t.shape[1], dtype=t.dtype)
            padded[: t.shape[0]] = t
            t = padded
        state["model." + name] = t
    state["model.decoder.layers.0.self_attention.linear_qkv._extra_state"] = io.BytesIO(b"te-fp8-meta")
    return state


def test_nemo1_pickled_weights_to_mcore(tmp_path, mcore_ckpt):
    _, meta = read_checkpoint(mcore_ckpt)
    cfg = dict(_nemo1_config(meta), vocab_size=meta["vocab_size"])
    cfg["scale_positional_embedding"] = True
    cfg["rotary_base"] = 8e6
    src = tmp_path / "n1"
    src.mkdir()
    (src / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save(_nemo1_state(mcore_ckpt, meta), src / "model_weights.ckpt")
    for f in (mcore_ckpt / "tokenizer").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    nemo1_to_mcore(_tar(src, tmp_path / "model.nemo"), tmp_path / "back")
    mcore_to_hf(tmp_path / "back", tmp_path / "hf_back")
    _assert_same_hf(tmp_path / "hf", tmp_path / "hf_back")
    assert (tmp_path / "hf_back" / "tokenizer.json").is_file()


def test_nemo1_distributed_weights_to_mcore(tmp_path, mcore_ckpt):
    """model_weights/ as a distributed checkpoint with NeMo 1's ``model.`` prefix; vocab from the tokenizer."""
    from megatron_prolong.convert import mcore

    c, meta = read_checkpoint(mcore_ckpt)
    src = tmp_path / "n1"
    src.mkdir()
    (src / "model_config.yaml").write_text(yaml.safe_dump(dict(_nemo1_config(meta), scale_positional_embedding=True)))
    model = model_config_from_meta(meta)
    with megatron_session():
        gpt = mcore.build_tp1_model(model, meta["vocab_size"], 4096, torch.float32)
        mcore.fill_model(gpt, DistCheckpointReader(c, prefix="").tensors(model, meta["vocab_size"]), model,
                         meta["vocab_size"])
        mcore.save_model(gpt, src / "model_weights", prefix="model.")
    nemo1_to_mcore(_tar(src, tmp_path / "model.nemo"), tmp_path / "back",
                   tokenizer=mcore_ckpt / "tokenizer")
    _, back_meta = read_checkpoint(tmp_path / "back")
    assert back_meta["vocab_size"] == 300  # from the tokenizer, not the 384 padded rows
    mcore_to_hf(tmp_path / "back", tmp_path / "hf_back")
    _assert_same_hf(tmp_path / "hf", tmp_path / "hf_back")


# ---------------------------------------------------------------------------- untrusted files
def _evil_tar(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w") as tar:
        data = b"num_layers: 1\n"
        info = tarfile.TarInfo("model_config.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        bad = tarfile.TarInfo({"absolute": "/tmp/evil.txt", "dotdot": "../../evil.txt",
                               "nested-dotdot": "model_weights/../../evil.txt",
                               "symlink": "model_weights.ckpt", "hardlink": "model_weights.ckpt",
                               "device": "dev"}[kind])
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(bad)
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "model_config.yaml"
            tar.addfile(bad)
        elif kind == "device":
            bad.type = tarfile.CHRTYPE
            tar.addfile(bad)
        else:
            bad.size = 4
            tar.addfile(bad, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested-dotdot", "symlink", "hardlink", "device"])
def test_unsafe_tarball_is_refused(tmp_path, kind):
    src = _evil_tar(tmp_path / "evil.nemo", kind)
    out = tmp_path / "sub" / "out"
    with pytest.raises(ConversionError, match="unsafe tarball"):
        nemo1_to_mcore(src, out)
    assert not out.exists()
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert not [p for p in (tmp_path / "sub").iterdir()]  # no extraction or temp folder left behind


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_is_not_executed(tmp_path):
    src = tmp_path / "n1"
    src.mkdir()
    (src / "model_config.yaml").write_text(yaml.safe_dump({
        "mcore_gpt": True, "num_layers": 1, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
        "normalization": "rmsnorm", "position_embedding_type": "rope", "activation": "swiglu", "bias": False}))
    torch.save({"model.embedding.word_embeddings.weight": torch.zeros(4, 64), "evil": _Payload()},
               src / "model_weights.ckpt")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ConversionError, match="weights-only"):
            nemo1_to_mcore(_tar(src, tmp_path / "model.nemo"), tmp_path / "out")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_nemo_bad_inputs(tmp_path, mcore_ckpt):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="not a NeMo 2 checkpoint"):
        nemo2_to_mcore(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "junk.nemo").write_bytes(b"not a tar")
    with pytest.raises(ConversionError, match="not a .nemo tarball"):
        nemo1_to_mcore(tmp_path / "junk.nemo", tmp_path / "out")
    mcore_to_nemo2(mcore_ckpt, tmp_path / "nemo2")
    y = tmp_path / "nemo2" / "context" / "model.yaml"
    doc = yaml.safe_load(y.read_text())
    doc["config"]["normalization"] = "LayerNorm"
    y.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConversionError, match="unsupported architecture"):
        nemo2_to_mcore(tmp_path / "nemo2", tmp_path / "out")
    doc["config"]["normalization"] = "RMSNorm"
    doc["config"]["num_layers"] = 3
    y.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConversionError, match="stacks 2 layers"):
        nemo2_to_mcore(tmp_path / "nemo2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
