"""Bad input gives a clear error and leaves nothing at OUT (work happens in a temporary folder)."""

from __future__ import annotations

import json

import pytest
from convert_helpers import make_hf_llama

from megatron_prolong.convert import ConversionError
from megatron_prolong.convert.cli import main as cli_main
from megatron_prolong.convert.hf import hf_to_mcore, mcore_to_hf


def _no_output(tmp_path, out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture
def hf_dir(tmp_path):
    make_hf_llama(tmp_path / "hf")
    return tmp_path / "hf"


def _edit(folder, **changes):
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    for mode in ("hf-to-mcore", "mcore-to-hf", "nemo-to-mcore", "mcore-to-nemo"):
        assert cli_main([mode, "--input", str(tmp_path / "empty"), "--output", str(out)]) == 1
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
        assert any(s in err for s in ("not a Hugging Face model folder", "not a megatron-prolong checkpoint",
                                      "not a NeMo 2 checkpoint")), err
        _no_output(tmp_path, out)


def test_unsupported_architecture(hf_dir, tmp_path):
    _edit(hf_dir, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ConversionError, match="unsupported architecture"):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _edit(hf_dir, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=True)
    with pytest.raises(ConversionError, match="attention_bias"):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, "low_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 4096}, "original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 4.0}, "not supported"),
])
def test_unsupported_rope(hf_dir, tmp_path, scaling, match):
    _edit(hf_dir, rope_scaling=scaling)
    with pytest.raises(ConversionError, match=match):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_vocab_and_shape_mismatch(hf_dir, tmp_path):
    _edit(hf_dir, vocab_size=310)
    with pytest.raises(ConversionError, match="vocabulary mismatch: model.embed_tokens.weight"):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")
    _edit(hf_dir, vocab_size=300, intermediate_size=128)
    with pytest.raises(ConversionError, match="shape mismatch: model.layers.0.mlp.gate_proj.weight"):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")
    _edit(hf_dir, intermediate_size=96, num_key_value_heads=4)
    with pytest.raises(ConversionError, match="k_proj"):
        hf_to_mcore(hf_dir, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_missing_and_extra_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_llama(tmp_path / "hf", layers=1)
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(f)
    save_file(dict(state, **{"model.layers.0.self_attn.q_proj.bias": state["model.norm.weight"].clone()}), f)
    with pytest.raises(ConversionError, match="does not use.*q_proj.bias"):
        hf_to_mcore(tmp_path / "hf", tmp_path / "out")
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, f)
    with pytest.raises(ConversionError, match="no tensor 'model.layers.0.mlp.up_proj.weight'"):
        hf_to_mcore(tmp_path / "hf", tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_existing_output_is_kept(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_mcore(hf_dir, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_incomplete_megatron_checkpoint(hf_dir, tmp_path):
    hf_to_mcore(hf_dir, tmp_path / "mc")
    meta_file = tmp_path / "mc" / "prolong_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["hidden_size"] = 128
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="shape"):
        mcore_to_hf(tmp_path / "mc", tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")
    for f in (tmp_path / "mc").glob("*.distcp"):
        f.unlink()
    (tmp_path / "mc" / "metadata.json").unlink()
    (tmp_path / "mc" / ".metadata").unlink()
    with pytest.raises(ConversionError, match="no distributed checkpoint"):
        mcore_to_hf(tmp_path / "mc", tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")
