"""Model FLOPs per step and MFU, with attention counted for causal, document-masked pairs only.

Conventions (those of "model FLOPs", PaLM appendix B / Megatron's MFU):

- Every weight matrix costs 2 FLOPs per weight per token in the forward pass and twice that in
  the backward pass: 6 x (matmul parameters) per token for forward + backward. Matmul parameters
  are Q, K, V, O and the three SwiGLU matrices of every layer plus the output layer; the embedding
  lookup (a gather) and the norm weights cost nothing.
- Attention: within a document of L tokens, causal masking leaves L(L+1)/2 query-key pairs. Each
  pair costs 2 x d_head FLOPs for Q K^T and 2 x d_head for P V, per query head, so the forward pass
  costs 4 * d_head * heads * L(L+1)/2 per layer and forward + backward 3 times that. Pairs that
  cross a document boundary are masked and not counted, so 8 documents of 8K cost 1/8 of one 64K
  document.
- Recomputation (activation checkpointing) is not counted: MFU measures useful work.

``GPU_SPECS`` holds the memory and the dense bf16 peak of the GPU types the trainer knows; the
config key ``train.gpu`` names one of them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float  # total device memory as the driver reports it (nvidia-smi), GiB
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core peak, TFLOP/s
    hbm_tb_s: float  # device memory bandwidth, TB/s (data sheet)


# Memory: nvidia-smi totals (H100 80GB 81,559 MiB; H200 143,771 MiB; A100 81,920 / 40,960 MiB).
# Peaks: NVIDIA data sheets, dense bf16 (the data sheets' headline numbers are with sparsity, 2x).
GPU_SPECS: dict[str, GPUSpec] = {
    "h100_80gb": GPUSpec("NVIDIA H100 SXM5 80GB", 81_559 / 1024, 989.0, 3.35),
    "h100_pcie": GPUSpec("NVIDIA H100 PCIe 80GB", 81_559 / 1024, 756.0, 2.0),
    "h200": GPUSpec("NVIDIA H200 SXM 141GB", 143_771 / 1024, 989.0, 4.8),
    "a100_80gb": GPUSpec("NVIDIA A100 SXM4 80GB", 81_920 / 1024, 312.0, 2.039),
    "a100_40gb": GPUSpec("NVIDIA A100 SXM4 40GB", 40_960 / 1024, 312.0, 1.555),
}


def gpu_spec(gpu: str) -> GPUSpec:
    try:
        return GPU_SPECS[gpu]
    except KeyError:
        raise ValueError(f"train.gpu={gpu!r} is not one of {', '.join(GPU_SPECS)}") from None


def _dims(model) -> tuple[int, int, int, int, int, int]:
    h = model.hidden_size
    heads = model.num_attention_heads
    d_head = h // heads
    kv = model.num_query_groups * d_head
    return model.num_layers, h, model.ffn_hidden_size, heads, d_head, kv


def layer_matmul_params(model) -> int:
    """Weights of one layer's matmuls: Q, K, V, O and SwiGLU's gate, up and down projections."""
    _, h, f, _, _, kv = _dims(model)
    return h * (h + 2 * kv) + h * h + 3 * h * f


def matmul_params(model, vocab_size: int) -> int:
    """Matmul weights that every token passes through: all layers plus the output layer."""
    return model.num_layers * layer_matmul_params(model) + model.hidden_size * vocab_size


def param_count(model, vocab_size: int) -> int:
    """All parameters: layers (with their two RMSNorm weights), final norm, embedding and output
    layer (one matrix when the embeddings are tied)."""
    n_layers, h = model.num_layers, model.hidden_size
    per_layer = layer_matmul_params(model) + 2 * h
    embeddings = vocab_size * h * (2 if model.untie_embeddings else 1)
    return n_layers * per_layer + h + embeddings


def _lengths_from_cu_seqlens(cu_seqlens: Iterable) -> list[int]:
    lengths: list[int] = []
    for cu in cu_seqlens:
        if hasattr(cu, "tolist"):
            cu = cu.tolist()
        rows = cu if cu and isinstance(cu[0], (list, tuple)) else [cu]  # [b, n+1] or [n+1]
        for row in rows:
            lengths.extend(int(b) - int(a) for a, b in zip(row[:-1], row[1:]))
    return lengths


def document_lengths(doc_lengths: Iterable[int] | None = None, cu_seqlens: Iterable | None = None) -> list[int]:
    """Document lengths from either form. ``cu_seqlens``: an iterable of per-micro-batch
    cumulative boundaries (tensors or lists, shape [n+1] or [b, n+1], as the data loader's
    ``cu_seqlens``; repeated final entries, i.e. zero-length padding documents, count nothing)."""
    if (doc_lengths is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of doc_lengths or cu_seqlens")
    lengths = list(doc_lengths) if doc_lengths is not None else _lengths_from_cu_seqlens(cu_seqlens)
    if any(n < 0 for n in lengths):
        raise ValueError("document lengths must be >= 0 (cu_seqlens must be non-decreasing)")
    return [int(n) for n in lengths]


def attention_flops(model, doc_lengths: Sequence[int]) -> int:
    """Forward + backward attention FLOPs of all layers over causal in-document pairs."""
    n_layers, _, _, heads, d_head, _ = _dims(model)
    pairs = sum(n * (n + 1) // 2 for n in doc_lengths)
    return 3 * n_layers * 4 * d_head * heads * pairs


def model_flops_per_step(
    model,
    vocab_size: int,
    doc_lengths: Iterable[int] | None = None,
    *,
    cu_seqlens: Iterable | None = None,
) -> int:
    """Model FLOPs (forward + backward) of one optimizer step over the whole global batch.

    ``doc_lengths``: the lengths of every document of every sequence in the step (a document that
    fills a 64K sequence is 65536), or ``cu_seqlens`` (an iterable of the loader's per-micro-batch
    boundaries). Matmul FLOPs are counted for every token, padding included (it passes through the
    matmuls), so pass the padding tail as a document too; the loader's cu_seqlens already do.
    ``vocab_size`` is the output layer's width (the padded vocabulary if you want to count the
    padding columns, which the output layer does compute).
    """
    lengths = document_lengths(doc_lengths, cu_seqlens)
    tokens = sum(lengths)
    return 6 * matmul_params(model, vocab_size) * tokens + attention_flops(model, lengths)


def model_tflops_per_gpu(flops: float, seconds: float, num_gpus: int) -> float:
    """Achieved model TFLOP/s per GPU."""
    if seconds <= 0 or num_gpus <= 0:
        raise ValueError("seconds and num_gpus must be > 0")
    return flops / seconds / num_gpus / 1e12


def mfu(flops: float, seconds: float, num_gpus: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all GPUs (0..1)."""
    if peak_tflops <= 0:
        raise ValueError("peak_tflops must be > 0")
    return model_tflops_per_gpu(flops, seconds, num_gpus) / peak_tflops


class PeakAlarm:
    """Warn once, loudly, when a step's model TFLOP/s per GPU exceeds the GPU's dense bf16 peak.

    No GPU can beat its peak, so such a step means the FLOP count is not what ran: most often a
    context-parallel layout that is silently not in effect (each rank attends only within its own
    chunk, a fraction of the counted attention work, which dominates at long context), else a
    model config that is not the model, or ``train.gpu`` naming a slower GPU than the one in use.
    """

    def __init__(self, gpu: str, layout: str, enabled: bool = True) -> None:
        self.gpu, self.layout, self.enabled = gpu, layout, enabled
        self.spec = gpu_spec(gpu)
        self.fired = False

    def message(self, step: int, flops: float, seconds: float, num_gpus: int) -> str | None:
        """The warning for this step, or None when its rate is physically possible."""
        tflops = model_tflops_per_gpu(flops, seconds, num_gpus)
        peak = self.spec.bf16_tflops
        if tflops <= peak:
            return None
        return (
            f"WARNING: step {step} ran at {tflops:.4g} model TFLOP/s per GPU, {tflops / peak:.3g}x the peak of "
            f"{peak:.4g} TFLOP/s of train.gpu={self.gpu} ({self.spec.name}, dense bf16): {flops:.3e} FLOPs "
            f"in {seconds:.3f} s on {num_gpus} GPU(s), layout {self.layout}. The FLOP count or the layout is "
            "wrong: check that context parallelism is in effect (a silently disabled CP computes a "
            "fraction of the counted attention), that the model config is the model, and that "
            "train.gpu names this GPU. Warned once; MFU above 100% is not real."
        )

    def check(self, step: int, flops: float, seconds: float, num_gpus: int) -> bool:
        """Print the warning to stderr the first time a step exceeds the peak; True if this step does."""
        text = self.message(step, flops, seconds, num_gpus) if seconds > 0 else None
        if text and self.enabled and not self.fired:
            print(f"[megatron-prolong] {text}", file=sys.stderr, flush=True)
            self.fired = True
        return text is not None
