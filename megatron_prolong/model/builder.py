"""Build the Llama-family GPTModel on Megatron-Core with the chosen attention backend."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_prolong.attention.config import AttentionConfig
from megatron_prolong.config import PLUGIN_RECOMPUTE, KernelConfig, ModelConfig, ParallelConfig, TrainConfig
from megatron_prolong.model.core_attention import DocumentCoreAttention
from megatron_prolong.model.init import init_parameters
from megatron_prolong.model.mlp import SwiGLURecomputeMLP
from megatron_prolong.model.norm import RebuiltRMSNorm, RMSNorm
from megatron_prolong.model.released import ReleasingColumnParallelLinear
from megatron_prolong.model.rope import RopeAngles, resolve_rope
from megatron_prolong.te.checkpoint import TECheckpointGPTModel
from megatron_prolong.te.linear import fp8_options


@dataclass
class ProLongTransformerConfig(TransformerConfig):
    """Megatron's TransformerConfig plus what the plugin's core attention reads."""

    rope_base: float = 500_000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 8.0
    rope_interpolation_factor: float | None = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope_kernel: str = "torch"  # triton | torch (kernels.rope, resolved)
    recompute_swiglu: bool = False  # train.recompute=selective with recompute_modules [swiglu]
    recompute_layernorm: bool = False  # ... and [layernorm] (the plugin's, not Megatron-Core's)


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_attention_backend(model: ModelConfig) -> str:
    if model.attention_backend == "auto":
        return "plugin"  # measured faster than the TE path in the whole trainer (docs/benchmarks.md)
    if model.attention_backend == "te" and not te_available():
        raise RuntimeError(
            "model.attention_backend=te but Transformer Engine is not installed; install the `te` "
            "extra (pip install 'megatron-prolong[te]') or use model.attention_backend=plugin"
        )
    return model.attention_backend


def padded_vocab_size(vocab_size: int, model: ModelConfig, tp: int) -> int:
    """Pad to a multiple that TP divides, the same for every layout that multiple allows."""
    multiple = math.lcm(model.make_vocab_size_divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def fusion_options(kernels: KernelConfig | None, te: bool, te_linears: bool = False) -> dict:
    """TransformerConfig fusion flags. TE path: what Megatron's TE layer spec supports (fused RoPE,
    fused SwiGLU, and weight gradients accumulated into the fp32 main grads where Apex's
    ``fused_weight_gradient_mlp_cuda`` exists: Megatron's own output layer needs it once the flag is
    on, and refuses to run without it, seen on an H200 with TE 2.20.2 and no Apex). Plugin path:
    Megatron's fused SwiGLU (torch.compile'd; CUDA only under ``auto``), and with TE's linears
    (``te_linears``) their weight-gradient accumulation under the TE path's rule."""
    if kernels is None:
        return dict(bias_activation_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    cuda = torch.cuda.is_available()
    swiglu = kernels.swiglu == "fused" or (kernels.swiglu == "auto" and cuda)
    wgrad = (te or te_linears) and cuda and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    if te:
        return dict(bias_activation_fusion=swiglu, apply_rope_fusion=cuda, gradient_accumulation_fusion=wgrad)
    return dict(bias_activation_fusion=swiglu, apply_rope_fusion=False, gradient_accumulation_fusion=wgrad,
                rope_kernel=resolve_rope(kernels.rope))


def build_transformer_config(
    model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, kernels: KernelConfig | None = None
) -> ProLongTransformerConfig:
    """``kernels=None`` keeps every fusion off (the unfused reference path)."""
    bf16 = train.precision == "bf16"
    te = resolve_attention_backend(model) == "te"
    selective = list(train.recompute_modules) if train.recompute == "selective" else []
    megatron_modules = [m for m in selective if m not in PLUGIN_RECOMPUTE]  # the plugin's: block_spec
    recompute = (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
                 if train.recompute == "full" else
                 dict(recompute_granularity="selective", recompute_modules=megatron_modules)
                 if megatron_modules else {})
    return ProLongTransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        **fusion_options(kernels, te, te_linears=model.linear == "te"),
        **fp8_options(model.fp8),  # TE's linears only: Megatron's block enters TE's FP8 autocast (te/linear.py)
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        cp_comm_type=parallel.cp_comm_type,
        hierarchical_context_parallel_sizes=parallel.hierarchical_cp_sizes,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # init_parameters draws every matrix itself, or a checkpoint fills it
        calculate_per_token_loss=True,
        rope_base=model.rope_base,
        rope_scaling=model.rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        rope_interpolation_factor=model.rope_interpolation_factor,
        attention=model.attention,
        # TE's THD batches vary in length (per-document padding): pipeline stages exchange shapes.
        variable_seq_lengths=te and parallel.pp > 1,
        recompute_swiglu="swiglu" in selective,
        recompute_layernorm="layernorm" in selective,
        **recompute,
    )


def block_spec(backend: str, config: TransformerConfig) -> ModuleSpec | TransformerBlockSubmodules:
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    # One RopeAngles shared by all layers: the angles are built once per micro-batch, not per layer.
    layer.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=DocumentCoreAttention, params={"rope": RopeAngles(config)})
    mlp = layer.submodules.mlp  # Megatron's builder: partial(MLP.as_mlp_submodule, submodules=...)
    if getattr(config, "recompute_layernorm", False):
        layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = RebuiltRMSNorm
        layer.submodules.self_attention.submodules.linear_qkv = ReleasingColumnParallelLinear
        mlp.keywords["submodules"].linear_fc1 = ReleasingColumnParallelLinear
    else:
        layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = RMSNorm
    if getattr(config, "recompute_swiglu", False):
        layer.submodules.mlp = partial(SwiGLURecomputeMLP.as_mlp_submodule, *mlp.args, **mlp.keywords)
    local_layers = get_num_layers_to_build(config)  # this pipeline stage's share
    return TransformerBlockSubmodules(layer_specs=[layer] * local_layers, layer_norm=RMSNorm)


def build_model(
    model: ModelConfig, config: ProLongTransformerConfig, vocab_size: int, seq_length: int, seed: int,
    init: bool = True,
) -> GPTModel:
    """One GPTModel chunk for this pipeline stage (no virtual pipeline).

    ``init=False`` leaves the matrices unset (uninitialised memory) for a checkpoint load that
    overwrites every parameter: the random draw of the full model costs minutes at 8B.
    """
    backend = resolve_attention_backend(model)
    spec = block_spec(backend, config)
    if backend == "plugin" and model.linear == "te":
        from megatron_prolong.te.layer_spec import with_te_linears

        spec = with_te_linears(spec)
    gpt = (TECheckpointGPTModel if backend == "te" else GPTModel)(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, model, config.tensor_model_parallel_size),
        max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not model.untie_embeddings,
        # The plugin's core attention applies RoPE itself (positions come from the document layout).
        position_embedding_type="rope" if backend == "te" else "none",
        rotary_base=int(model.rope_base),
        rope_scaling=model.rope_scaling == "llama3",
        rope_scaling_factor=model.rope_scaling_factor,
        seq_len_interpolation_factor=model.rope_interpolation_factor,
    )
    if init:
        init_parameters(gpt, seed, model.init_method_std, model.num_layers)
    return gpt
