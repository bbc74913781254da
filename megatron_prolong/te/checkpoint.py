"""One checkpoint format for both layer specs: the plugin's (Megatron-Core's local spec) and
Transformer Engine's (``model.attention_backend=te``).

Per layer, the two specs hold the same tensors under different module names: TE fuses each
RMSNorm into the linear layer after it. Megatron-Core 0.19.2 already writes both under the TE
names (the local spec's ``sharded_state_dict_keys_map`` renames its norms), so the tensors of a
checkpoint load into either spec. What differs is TE's ``_extra_state`` (FP8 scaling metadata):

- the four linear layers carry it in both specs (Megatron's local linears write ``None`` for
  compatibility and ignore what they read; TE writes an empty tensor without FP8 and ignores
  ``None``), so those keys stay;
- TE-only modules carry it too (the final ``TENorm``; ``TEDotProductAttention``'s is already
  left out by Megatron): a checkpoint of the plugin path or of ``hf-to-mcore`` has no such keys.
  The TE model neither writes nor requires them.

Without FP8 the extra state holds nothing (TE 2.x ``get_extra_state`` returns an empty tensor
unless FP8 is on). With ``model.fp8`` the four linears' extra state is TE's FP8 scaling state:
Megatron's local linears ignore it when they load, so a run that moves to Megatron's linears
drops it, and one that moves back to FP8 starts its scaling afresh.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

# Per-layer tensors: (local-spec state-dict name, TE-spec state-dict name, checkpoint key after
# "decoder.layers."; layers are stacked on a leading axis).
LAYER_TENSORS: tuple[tuple[str, str, str], ...] = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight",
     "self_attention.linear_qkv.layer_norm_weight"),
    ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight"),
    ("self_attention.linear_proj.weight", "self_attention.linear_proj.weight", "self_attention.linear_proj.weight"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
    ("mlp.linear_fc1.weight", "mlp.linear_fc1.weight", "mlp.linear_fc1.weight"),
    ("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", "mlp.linear_fc2.weight"),
)
# Per-layer modules with ``_extra_state`` in both specs (same names in both).
SHARED_EXTRA_STATE: tuple[str, ...] = (
    "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
)
# Outside the layers both specs hold the same names: the embedding, the final norm's weight, and
# (untied) the output layer, whose ``_extra_state`` GPTModel drops itself.
MODEL_TENSORS: tuple[str, ...] = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                  "output_layer.weight")


def _layer_suffix(name: str) -> str | None:
    """``decoder.layers.<i>.<rest>`` -> ``<rest>`` (None outside the layers)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "decoder" and parts[1] == "layers" and parts[2].isdigit():
        return ".".join(parts[3:])
    return None


def is_te_only_extra_state(name: str) -> bool:
    """A state-dict name of TE extra state that the local spec has no counterpart for."""
    if not name.endswith("._extra_state"):
        return False
    module = _layer_suffix(name.removesuffix("._extra_state"))
    return module not in SHARED_EXTRA_STATE


class TECheckpointGPTModel(GPTModel):
    """GPTModel on TE's layer spec whose checkpoints are the plugin path's (see module docstring)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return {k: v for k, v in sd.items() if not is_te_only_extra_state(k.removeprefix(prefix))}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The TE-only extra state is not in checkpoints: keep this model's own (empty without FP8).
        own = {k: v for k, v in self.state_dict().items() if is_te_only_extra_state(k) and k not in state_dict}
        return super().load_state_dict({**state_dict, **own}, strict=strict, assign=assign)
