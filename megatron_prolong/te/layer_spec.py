"""The plugin's layer with Transformer Engine's linears (``model.linear=te``).

The plugin's block spec (``model.builder.block_spec``) is kept whole: its core attention
(``DocumentCoreAttention`` with the RoPE angles shared by all layers: document masking, the
balanced CP split, cuDNN THD without padding), its MLP class and its final norm. Only the linears
change: TE's fused RMSNorm + column-parallel linear for ``linear_qkv`` and ``linear_fc1`` (the
layer's two norms become ``IdentityOp``), TE's row-parallel linear for ``linear_proj`` and
``linear_fc2``. These are the modules of Megatron's TE layer spec, so the layer's tensors carry
that spec's names, which are the checkpoint keys of both specs (:mod:`.checkpoint`): checkpoints
move between ``model.linear=local`` and ``te`` as they do between the plugin and TE backends.

TE is imported only when such a model is built; without it the build is refused in words (the
configuration check, ``megatron_prolong.config.validate``, refuses it earlier still).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_prolong.te.linear import validate_te_linears


def _with_mlp_linears(mlp, fc1: type, fc2: type):
    """The MLP slot with its linears replaced: Megatron's builder puts a ``partial`` of
    ``MLP.as_mlp_submodule`` there (its ``submodules`` keyword), older ones a ModuleSpec."""
    if isinstance(mlp, partial) and "submodules" in mlp.keywords:
        subs = replace(mlp.keywords["submodules"], linear_fc1=fc1, linear_fc2=fc2)
        return partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": subs})
    if isinstance(mlp, ModuleSpec) and mlp.submodules is not None:
        return replace(mlp, submodules=replace(mlp.submodules, linear_fc1=fc1, linear_fc2=fc2))
    raise TypeError(f"the layer's MLP slot is {mlp!r}: neither a ModuleSpec nor Megatron's MLP builder")


def swap_linears(block: TransformerBlockSubmodules, norm_linear: type, row_linear: type) -> TransformerBlockSubmodules:
    """``block`` with each layer's linears replaced (``norm_linear``: a fused norm + column-parallel
    linear, ``row_linear``: a row-parallel linear) and its two norms folded into them. A new spec:
    ``block``'s layer specs (one object shared by all layers) are not changed."""
    layers = []
    for layer in block.layer_specs:
        sub = layer.submodules
        attn = replace(sub.self_attention, submodules=replace(
            sub.self_attention.submodules, linear_qkv=norm_linear, linear_proj=row_linear))
        sub = replace(sub, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, self_attention=attn,
                      mlp=_with_mlp_linears(sub.mlp, norm_linear, row_linear))
        layers.append(replace(layer, submodules=sub))
    return replace(block, layer_specs=layers)


def with_te_linears(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """The plugin's block spec with TE's linears; refused where TE is missing or too old."""
    validate_te_linears("te", "plugin")
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TERowParallelLinear

    return swap_linears(block, TELayerNormColumnParallelLinear, TERowParallelLinear)

