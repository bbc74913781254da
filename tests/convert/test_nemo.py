"""NeMo 2 folders both ways, NeMo 1 .nemo tarballs to Megatron, and untrusted-file handling.

No NeMo version with the LLM collection installs on Python 3.12 here (nemo-toolkit 3.0 is
speech-only; 2.x pins older Pythons/stacks), so the fixtures are built from NeMo's documented
format, not by NeMo itself: NeMo 2 = ``weights/`` (a Megatron distributed checkpoint of the
GPTModel with keys prefixed ``module.``) + ``context/model.yaml``; NeMo 1 = a tar of
``model_config.yaml`` and ``model_weights.ckpt`` (keys ``model.decoder.layers.N...``, TE norm names,
``_extra_state`` entries) or ``model_weights/`` (distributed checkpoint, keys prefixed ``model.``).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from convert_helpers import hf_state, make_hf_llama

from megatron_prolong.convert import ConversionError
from megatron_prolong.convert.hf import hf_to_mcore, mcore_to_hf
from megatron_prolong.convert.mcore import DistCheckpointReader, megatron_session, model_config_from_meta, read_checkpoint
from megatron_prolong.convert.nemo import mcore_to_nemo2, nemo1_to_mcore, nemo2_to_mcore


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


@pytest.fixture
def mcore_ckpt(tmp_path):
    make_hf_llama(tmp_path / "hf", rope_theta=8e6, max_pos=16384,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    return tmp_path / "mc"


def test_nemo2_round_trip(tmp_path, mcore_ckpt):
    mcore_to_nemo2(mcore_ckpt, tmp_path / "nemo2")
    nemo = tmp_path / "nemo2"
    assert (nemo / "weights" / "metadata.json").is_file()
    assert (nemo / "context" / "nemo_tokenizer" / "tokenizer.json").is_file()
    doc = yaml.safe_load((nemo / "context" / "model.yaml").read_text())
    assert doc["_target_"].endswith("llama.LlamaModel")
    assert doc["config"]["_target_"].endswith("Llama31Config")
    assert doc["config"]["rotary_base"] == 8e6 and doc["config"]["scale_factor"] == 8.0
    with megatron_session():
        keys = set(DistCheckpointReader(nemo / "weights").metadata)
    assert keys and all(k.startswith("module.") for k in keys)
    assert "module.decoder.layers.self_attention.linear_qkv.weight" in keys

    nemo2_to_mcore(nemo, tmp_path / "back")
    a, b = _all_tensors(mcore_ckpt), _all_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _, meta = read_checkpoint(tmp_path / "back")
    assert meta["model"]["rope_scaling"] == "llama3" and meta["model"]["rope_base"] == 8e6
    assert meta["vocab_size"] == 300 and meta["tokenizer"]["path"].endswith("back/tokenizer")
    mcore_to_hf(tmp_path / "back", tmp_path / "hf_back")
    _assert_same_hf(tmp_path / "hf", tmp_path / "hf_back")


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
