"""Parameter initialisation that does not depend on the parallel layout.

Megatron draws initial weights from one RNG stream per rank, so a model built with TP=2 or PP=2
starts from different weights than TP=1. Here every full (unsharded) matrix is drawn from its own
generator, seeded by the run seed and the parameter's global name, and each rank keeps its slice:
any TP x PP layout starts from the same model, and per-step losses are comparable across layouts.

With tied embeddings and PP > 1 the last stage holds its own copy of the embedding as
``output_layer.weight`` (Megatron keeps the two equal by summing their gradients); that copy is
drawn under the embedding's name, so both stages start from the same matrix.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core import parallel_state


def _global_name(model: torch.nn.Module, name: str) -> str:
    """Local layer indices (per pipeline stage) become global layer numbers."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        layer = model.decoder.layers[int(parts[i + 1])]
        parts[i + 1] = str(layer.layer_number - 1)
    return ".".join(parts)


def _std(name: str, std: float, num_layers: int) -> float:
    # Megatron's scaled init for the projections that feed the residual stream.
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return std / math.sqrt(2.0 * num_layers)
    return std


@torch.no_grad()
def init_parameters(
    model: torch.nn.Module, seed: int, std: float, num_layers: int, gated: bool = True
) -> None:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue  # norm weights keep their ones
        key = _global_name(model, name)
        if key.startswith("module."):
            key = key[len("module."):]
        if tied and key == "output_layer.weight":
            key = "embedding.word_embeddings.weight"
        shape = list(param.shape)
        dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
        if dim >= 0:
            shape[dim] *= tp_size
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        full = torch.empty(shape, dtype=torch.float32).normal_(0.0, _std(key, std, num_layers), generator=gen)
        if dim >= 0 and key.endswith("linear_fc1.weight") and gated:
            # SwiGLU's fused [gate; up]: each TP rank holds [gate_r; up_r].
            full = torch.cat([half.chunk(tp_size, dim=dim)[tp_rank] for half in full.chunk(2, dim=dim)], dim=dim)
        elif dim >= 0:
            full = full.chunk(tp_size, dim=dim)[tp_rank]
        param.copy_(full.to(param.dtype))
