"""What each of Megatron-Core 0.19.2's TE module classes adds to a layer's state (read from
``megatron/core/extensions/transformer_engine.py``): ``TELayerNormColumnParallelLinear`` (TE's
LayerNormLinear) ``weight`` and ``layer_norm_weight`` (RMSNorm: no bias) plus TE's
``_extra_state``, ``TERowParallelLinear`` ``weight`` plus ``_extra_state``, and
``TEDotProductAttention`` nothing in the sharded state dict (its ``sharded_state_dict`` keeps only a
learnable softmax offset). Without TE the classes are Megatron's placeholders, still distinct."""

from __future__ import annotations

from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.transformer.identity_op import IdentityOp

TE_HOLDS = {  # per TE module class: the names it adds to a layer's state
    te_ext.TELayerNormColumnParallelLinear: ("weight", "layer_norm_weight", "_extra_state"),
    te_ext.TERowParallelLinear: ("weight", "_extra_state"),
    te_ext.TEDotProductAttention: (),
    IdentityOp: (),
}
