"""``model.linear=te`` (TE's linears under the plugin's attention) and ``model.fp8`` on a machine
without Transformer Engine: the configuration rules, the refusal where TE is missing, the FP8
fields Megatron reads, and the layer spec. Where a rule needs TE present, only the version
lookup is given a release (as in tests/model/test_attention_backend.py); Megatron's TE module
classes are the real ones of ``megatron.core.extensions.transformer_engine`` (placeholders
without TE, still distinct classes). tests/gpu/test_te_linear.py runs the layer with TE.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.transformer.identity_op import IdentityOp
from te_holds import TE_HOLDS
from trainrun import compose_config

from megatron_prolong.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, validate
from megatron_prolong.inference import megatron_session
from megatron_prolong.model.builder import block_spec, build_model, build_transformer_config
from megatron_prolong.model.core_attention import DocumentCoreAttention
from megatron_prolong.model.mlp import SwiGLURecomputeMLP
from megatron_prolong.te import thd
from megatron_prolong.te.checkpoint import LAYER_TENSORS
from megatron_prolong.te.layer_spec import swap_linears

BF16 = ("train.precision=bf16",)  # the demo preset trains in fp32
NO_TE = pytest.mark.skipif(thd.installed_te_version() is not None, reason="Transformer Engine is installed here")


@pytest.fixture
def te_2_20(monkeypatch):
    monkeypatch.setattr(thd, "installed_te_version", lambda: "2.20.2")


def refusal(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*overrides), world_size=1)
    return str(err.value)


@NO_TE
def test_te_linears_without_te_are_refused_naming_the_key_and_the_fix():
    msg = refusal("model.linear=te")
    assert msg == ("model.linear=te needs Transformer Engine, which is not installed; install the `te` extra "
                   "(pip install 'megatron-prolong[te]') or set model.linear=local")


def test_te_older_than_the_floor_is_refused(monkeypatch):
    monkeypatch.setattr(thd, "installed_te_version", lambda: "2.7.1+cu12")
    msg = refusal("model.linear=te")
    assert "Transformer Engine >= 2.8, installed: 2.7.1+cu12" in msg and "model.linear=local" in msg
    monkeypatch.setattr(thd, "installed_te_version", lambda: "2.8.0")
    validate(compose_config("model.linear=te"), world_size=1)


@pytest.mark.parametrize("overrides,words", [
    (["model.linear=fast"], "model.linear='fast' is not one of local, te"),
    (["model.fp8=e4m3"], "model.fp8='e4m3' is not one of none, delayed, tensorwise"),
    (["model.fp8=delayed"], "model.fp8=delayed runs Transformer Engine's linears in FP8, and model.linear=local"),
    (["model.linear=te", "model.fp8=tensorwise", "train.precision=fp32"], "train.precision=fp32 is not bf16"),
    # 264 = 8 heads x 33: a hidden size TE's FP8 GEMMs cannot take
    ([*BF16, "model.linear=te", "model.fp8=delayed", "model.hidden_size=264"], "model.hidden_size=264"),
    ([*BF16, "model.linear=te", "model.fp8=delayed", "data.seq_length=201"], "tokens per rank"),
    ([*BF16, "model.linear=te", "model.fp8=delayed", "model.ffn_hidden_size=712"], "model.ffn_hidden_size / parallel.tp=712"),
])
def test_fp8_and_linear_refusals_name_the_key(te_2_20, overrides, words):
    msg = refusal(*overrides)
    assert words in msg and "\n" not in msg, msg


def test_fp8_runs_on_te_linears_or_the_te_backend(te_2_20):
    for recipe in ("delayed", "tensorwise"):
        validate(compose_config(*BF16, "model.linear=te", f"model.fp8={recipe}"), world_size=1)
        validate(compose_config(*BF16, "model.attention_backend=te", f"model.fp8={recipe}"), world_size=1)


@NO_TE
def test_trainer_refuses_te_linears_in_one_line_before_starting(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_prolong.train", f"run.dir={tmp_path / 'run'}",
                          "model.linear=te", "model.fp8=delayed"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == ("megatron-prolong: invalid configuration: model.linear=te needs Transformer "
                                  "Engine, which is not installed; install the `te` extra (pip install "
                                  "'megatron-prolong[te]') or set model.linear=local")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fp8,want", [
    ("none", dict(fp8=None)),
    ("delayed", dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024, fp8_amax_compute_algo="max")),
    ("tensorwise", dict(fp8="hybrid", fp8_recipe="tensorwise")),
])
def test_fp8_fields_megatron_reads(fp8, want):
    model = ModelConfig(num_layers=2, linear="te", fp8=fp8)
    with megatron_session():
        tc = build_transformer_config(model, ParallelConfig(), TrainConfig(precision="bf16"))
    assert {k: getattr(tc, k) for k in want} == want
    assert tc.fp8_dot_product_attention is False and tc.fp8_param is False  # attention and weights stay bf16


@NO_TE
def test_building_te_linears_without_te_is_refused_in_words():
    model = ModelConfig(num_layers=2, linear="te")
    with megatron_session():
        tc = build_transformer_config(model, ParallelConfig(), TrainConfig(precision="bf16"))
        with pytest.raises(ValueError, match=r"^model\.linear=te needs Transformer Engine, which is not installed"):
            build_model(model, tc, 300, 64, seed=0)


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_te_linear_spec_keeps_the_plugins_attention_mlp_and_final_norm(recompute):
    with megatron_session():
        tc = build_transformer_config(ModelConfig(num_layers=3), ParallelConfig(),
                                      TrainConfig(precision="bf16", recompute=recompute))
        plugin = block_spec("plugin", tc)
    before = repr(plugin)
    spec = swap_linears(plugin, te_ext.TELayerNormColumnParallelLinear, te_ext.TERowParallelLinear)
    assert repr(plugin) == before  # the plugin's spec is left as it was
    assert len(spec.layer_specs) == 3 and spec.layer_norm is plugin.layer_norm
    rope = {id(layer.submodules.self_attention.submodules.core_attention.params["rope"]) for layer in spec.layer_specs}
    assert rope == {id(plugin.layer_specs[0].submodules.self_attention.submodules.core_attention.params["rope"])}
    for layer, old in zip(spec.layer_specs, plugin.layer_specs):
        sub, attn = layer.submodules, layer.submodules.self_attention.submodules
        mlp = sub.mlp.keywords["submodules"]
        assert attn.core_attention.module is DocumentCoreAttention
        assert sub.mlp.func == old.submodules.mlp.func
        assert (getattr(sub.mlp.func, "__self__", None) is SwiGLURecomputeMLP) == (recompute == "selective")
        slots = {"input_layernorm": sub.input_layernorm, "pre_mlp_layernorm": sub.pre_mlp_layernorm,
                 "self_attention.linear_qkv": attn.linear_qkv, "self_attention.linear_proj": attn.linear_proj,
                 "mlp.linear_fc1": mlp.linear_fc1, "mlp.linear_fc2": mlp.linear_fc2}
        assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp
        assert attn.linear_qkv is mlp.linear_fc1 is te_ext.TELayerNormColumnParallelLinear
        assert attn.linear_proj is mlp.linear_fc2 is te_ext.TERowParallelLinear
        # the tensors these modules hold are the TE column of the checkpoint table, i.e. the
        # checkpoint keys the plugin path writes: checkpoints move between the two
        names = {f"{path}.{held}" for path, module in slots.items() for held in TE_HOLDS[module]}
        assert {n for n in names if not n.endswith("._extra_state")} == {row[1] for row in LAYER_TENSORS}
        assert {row[1] for row in LAYER_TENSORS} == {row[2] for row in LAYER_TENSORS}

