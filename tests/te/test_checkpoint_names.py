"""The TE <-> local name table of megatron_prolong.te.checkpoint against Megatron-Core 0.19.2.

Local side: a real plugin-path model, its state-dict names and sharded checkpoint keys. TE side
(Transformer Engine is not installed here): Megatron's own TE layer spec, which builds without TE
(its TE classes are then placeholders, still distinct objects), tells which module fills each
slot; what each TE module holds is stated in tests/te_holds.py. tests/gpu/test_te_checkpoint.py checks the TE side on a real TE model.
"""

from __future__ import annotations

import pytest
from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.identity_op import IdentityOp
from te_holds import TE_HOLDS

from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig
from megatron_prolong.inference import SHARDING_META, megatron_session
from megatron_prolong.model.builder import build_model, build_transformer_config
from megatron_prolong.te.checkpoint import (
    LAYER_TENSORS, MODEL_TENSORS, SHARED_EXTRA_STATE, is_te_only_extra_state,
)

LOCAL, TE, CKPT = (tuple(row[i] for row in LAYER_TENSORS) for i in range(3))


@pytest.fixture(scope="module")
def local_model():
    model = ModelConfig(num_layers=2, attention_backend="plugin")
    with megatron_session():
        tconfig = build_transformer_config(model, ParallelConfig(), TrainConfig(precision="fp32"))
        gpt = build_model(model, tconfig, 300, 64, seed=0)
        yield gpt, gpt.sharded_state_dict(metadata=SHARDING_META)


def test_local_spec_names_and_checkpoint_keys_are_the_table(local_model):
    gpt, sharded = local_model
    for i in range(2):
        names = {n.removeprefix(f"decoder.layers.{i}.") for n, _ in gpt.named_parameters()
                 if n.startswith(f"decoder.layers.{i}.")}
        assert names == set(LOCAL)
    keys = {v.key for v in sharded.values()}
    want = {f"decoder.layers.{k}" for k in CKPT} | {f"decoder.layers.{m}._extra_state" for m in SHARED_EXTRA_STATE}
    assert keys == want | set(MODEL_TENSORS)
    # The local spec writes its norms under TE's fused names (Megatron's sharded_state_dict_keys_map).
    for local, ckpt in zip(LOCAL, CKPT):
        assert sharded[f"decoder.layers.0.{local}"].key == f"decoder.layers.{ckpt}"


def _te_layer_spec(monkeypatch):
    if gpt_layer_specs.TESpecProvider is None:  # no TE: Megatron leaves its provider unset
        monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider)
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


def test_te_spec_fuses_the_norms_into_the_linears(monkeypatch):
    sub = _te_layer_spec(monkeypatch).submodules
    attn, mlp = sub.self_attention.submodules, sub.mlp.keywords["submodules"]
    slots = {
        "input_layernorm": sub.input_layernorm, "pre_mlp_layernorm": sub.pre_mlp_layernorm,
        "self_attention.linear_qkv": attn.linear_qkv, "self_attention.core_attention": attn.core_attention,
        "self_attention.linear_proj": attn.linear_proj, "mlp.linear_fc1": mlp.linear_fc1,
        "mlp.linear_fc2": mlp.linear_fc2,
    }
    assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp
    names = set()
    for path, module in slots.items():
        assert module in TE_HOLDS, (path, module)
        names |= {f"{path}.{held}" for held in TE_HOLDS[module]}
    tensors = {n for n in names if not n.endswith("._extra_state")}
    extra = {n.removesuffix("._extra_state") for n in names if n.endswith("._extra_state")}
    assert tensors == set(TE)
    assert extra == set(SHARED_EXTRA_STATE)
    # TE's own names are the checkpoint keys: no renaming map for these tensors on the TE side.
    assert set(TE) == set(CKPT)
    assert not set(sub.sharded_state_dict_keys_map) & set(TE)


@pytest.mark.parametrize("name,te_only", [
    ("decoder.final_layernorm._extra_state", True),
    ("decoder.layers.3.self_attention.core_attention._extra_state", True),
    ("decoder.layers.3.self_attention.linear_qkv._extra_state", False),
    ("decoder.layers.0.mlp.linear_fc2._extra_state", False),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", False),
    ("decoder.final_layernorm.weight", False),
])
def test_te_only_extra_state(name, te_only):
    assert is_te_only_extra_state(name) is te_only
