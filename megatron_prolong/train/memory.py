"""Per-GPU memory estimate of a layout, and a refusal (with the breakdown and fixes) when it cannot fit.

Everything is bytes on the busiest rank (the first pipeline stage, which also holds the most
in-flight micro-batches under 1F1B). Notation: s = tokens of one micro-batch on this rank
(micro_batch_size x seq_length / cp), h = hidden size, f = FFN size, kv = key/value width on this
TP rank (query groups / tp, at least one group, x d_head), t = tp, e = bytes per activation
element (2 for bf16), h_sp = h / t with sequence parallelism and h without.

Model state (Megatron-Core DDP with ``grad_reduce_in_fp32=True``, as the trainer builds it):
  weights  e x P_rank          (bf16 copies; P_rank = this rank's share of layers, embedding and
                                output layer: layers / pp, matrices / tp, vocabulary padded)
  grads    4 x P_rank          (fp32 main-grad buffer; the distributed optimizer does not shard it)
  optimizer 12 x P_rank / (dp x cp)  fp32 master weights + Adam m and v. Megatron's distributed
                                optimizer shards them over the data-parallel group *including*
                                context parallelism; without it every rank holds all 12 x P_rank.
                                (fp32 training: 8 x P_rank, no separate master copy.)

Activations saved for backward, per layer (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", redone for Llama: no dropout, RMSNorm, GQA, SwiGLU,
and flash / document attention, which keeps no s x s score matrix, so their 5as/h term is gone):
  input RMSNorm: input + output           2 x e x h_sp
  q, k after RoPE; v                      e x (h + 2 kv) / t
  attention output (input of proj)        e x h / t
  softmax statistics (fp32)               4 x heads / t
  pre-MLP RMSNorm: input + output         2 x e x h_sp
  fc1 output (gate and up), SwiGLU output e x 3f / t
  => per token  e x (4 h_sp + (2h + 2kv + 3f) / t)  (+ the softmax statistics)
  For bf16, t = 1: s (12h + 4kv + 6f) bytes; Llama-3-8B at 64K: exactly 8.5 GiB.

The analytic count misses implementation copies (on the TE path the fused QKV output that V is a
view of; kernel workspaces, allocator rounding; the plugin path hands attention a V of its own, and
a census of its saved tensors at 64K on an H100 matches the count: 8.54 GiB, docs/benchmarks.md),
so the estimate multiplies it by a factor per
attention backend, LAYER_FACTOR, fitted to peaks that tools/bench.py measured
(docs/benchmarks/bench_*.json; ``python -m megatron_prolong.train.memory_report --calibrate FILE``
prints the fit). tests/train/test_memory.py checks the estimate against every recorded peak.

Recompute (``train.recompute``):
  none       every layer keeps the above.
  selective  what ``train.recompute_modules`` names (default ``[swiglu, layernorm]``):
             swiglu     the plugin's MLP drops the SwiGLU output after fc2's forward and recomputes
                        it from fc1's output (model/mlp.py): -e x f/t per token, one elementwise pass;
             layernorm  the plugin's two RMSNorm outputs are dropped after the QKV / fc1 forward
                        and rebuilt from the norms' inputs (model/norm.py): -2 e x h_sp per token
                        (-e x h_sp with mlp, whose checkpoint keeps the pre-MLP norm's output);
             core_attn  Megatron-Core's: with flash attention it only drops the softmax statistics,
                        i.e. it saves almost nothing at long context;
             mlp        Megatron-Core's: the fc1 / SwiGLU outputs (3f/t per token), recomputing fc1.
  full       (uniform, one layer per checkpoint) each layer keeps only its input, e x h_sp per
             token; during the backward pass one layer is recomputed and holds its full
             activations again (``recompute_layer``).
Pipeline parallelism (1F1B): stage 0 holds min(pp, micro-batches per step) micro-batches.

Context parallelism: the K/V of the whole sequence are all-gathered on every CP rank. Transformer
Engine re-gathers them in the backward pass (a transient, counted in ``workspace``); the plugin's
attention (``model.attention_backend=plugin``) keeps the rectangles' K/V for backward (at most the gathered K/V), an extra
e x 2 kv x (cp - 1) x s per layer.

Logits: the output layer and loss run on blocks of ``logits_block`` tokens (2,048, as ProLong),
each recomputed in the backward pass, so one block of logits exists at a time. Unfused cross
entropy (``kernels.cross_entropy=torch``): bf16 logits, fp32 copy, fp32 softmax and fp32 gradient,
14 bytes per (token, vocabulary column on this TP rank); fused (``triton``, the default on GPUs):
the bf16 logits only, turned into their gradient in place, plus the output layer's weight gradient,
summed over the blocks in fp32 and then cast to bf16 (4 + e bytes per weight of the output layer on
this TP rank). Plus the final norm's input and output (2 x e x h_sp per token).

Workspace: gradients alive while one layer is back-propagated (fc1 / SwiGLU output gradients
e x 3f/t, two hidden-size gradients e x 2h, the sequence-parallel all-gather buffer e x h) and the
CP K/V gather.
The logits (the loss's backward, first) and the workspace with the recomputed layer (each layer's
backward, after it) are not alive at the same time: the peak counts the larger of the two. Summed,
they put the estimate 2-13% above every peak measured on an H100 on 2026-12-07/08 (one and two
layers, with and without recompute); with the larger one, within -4% / +6% of them
(docs/benchmarks.md, "Recompute choices at 64K").

Overhead: a fixed allowance (default 4 GiB) for the CUDA context, NCCL buffers and allocator
fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from megatron_prolong.config import RECOMPUTE_MODULES, ConfigError, TrainConfig
from megatron_prolong.train.flops import gpu_spec

GiB = 1024**3
#: measured / analytic per-layer activations (fitted: ``--calibrate``, docs/benchmarks.md)
LAYER_FACTOR = {"plugin": 1.0, "te": 9.8 / 8.5}
DEFAULT_OVERHEAD_GIB = 4.0
DEFAULT_LOGITS_BLOCK = 2048
LOGITS_BYTES_PER_ELEMENT = {"torch": 14, "triton": 2}  # see "Logits" above
#: an estimate this far above the GPU's memory is refused; closer ones only warned about (the
#: estimate is within this fraction of every measured peak, tests/train/test_memory.py)
MARGIN = 0.10

@dataclass
class MemoryEstimate:
    """Bytes per GPU on the busiest rank; ``total`` is their sum, except that the logits and the
    workspace plus the recomputed layer (the backward's two phases) count as the larger of the two."""

    weights: int
    grads: int
    optimizer: int
    activations: int  # saved for backward by all local layers and in-flight micro-batches
    recompute_layer: int  # full recompute: one layer's activations during its backward
    logits: int  # one block of logits and loss, final norm
    workspace: int  # backward gradient buffers, CP K/V gather, SP all-gather
    overhead: int  # CUDA context, NCCL, fragmentation
    gpu_memory: int
    layout: str = ""
    info: dict = field(default_factory=dict)

    PARTS = ("weights", "grads", "optimizer", "activations", "recompute_layer", "logits", "workspace", "overhead")

    @property
    def total(self) -> int:
        static = self.weights + self.grads + self.optimizer + self.activations + self.overhead
        return static + max(self.logits, self.workspace + self.recompute_layer)  # backward's two phases

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def refused(self) -> bool:
        """Above the GPU's memory by more than the estimate's error (MARGIN)."""
        return self.total > self.gpu_memory * (1 + MARGIN)

    def gib(self, part: str) -> float:
        return getattr(self, part) / GiB

    def breakdown(self) -> str:
        static = ("weights", "grads", "optimizer", "activations", "overhead")
        backward = f"workspace {self.gib('workspace'):.1f}" + (
            f" + recomputed layer {self.gib('recompute_layer'):.1f}" if self.recompute_layer else "")
        parts = ", ".join([f"{p} {self.gib(p):.1f}" for p in static if getattr(self, p)]
                          + [f"the larger of logits {self.gib('logits'):.1f} and {backward}"])
        return (f"{self.total / GiB:.1f} GiB per GPU ({parts}; per-layer activations "
                f"{self.info.get('layer_activation_gib', 0):.2f} GiB at {self.info.get('tokens_per_rank')} "
                f"tokens per rank) vs {self.gpu_memory / GiB:.1f} GiB available")

    def __str__(self) -> str:
        return f"{self.layout}: {self.breakdown()}"


def _get(cfg, key, default=None):
    return getattr(cfg, key, default) if cfg is not None else default


def _padded_vocab(vocab_size: int, multiple: int, tp: int) -> int:
    m = math.lcm(multiple, tp)
    return -(-vocab_size // m) * m


def rank_params(model_cfg, vocab_size: int, tp: int, pp: int) -> int:
    """Parameters on the busiest (tp, pp) rank: its layers, and the embedding and/or output
    layer (first / last stage; both when pp = 1), vocabulary-parallel over TP."""
    h, f = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    d_head = h // model_cfg.num_attention_heads
    kv = max(model_cfg.num_query_groups // tp, 1) * d_head * tp  # KV heads replicated if tp > groups
    layer = (h * (h + 2 * kv) + h * h + 3 * h * f) // tp + 2 * h
    layers = math.ceil(model_cfg.num_layers / pp) * layer
    vocab = _padded_vocab(vocab_size, _get(model_cfg, "make_vocab_size_divisible_by", 128), tp)
    matrix = vocab * h // tp
    untied = _get(model_cfg, "untie_embeddings", True)
    if pp == 1:
        ends = matrix * (2 if untied else 1) + h
    else:  # first stage: embedding; last stage: final norm + output layer (a copy when tied)
        ends = matrix + h
    return layers + ends


def layer_activation_bytes(
    model_cfg,
    tokens: int,
    tp: int,
    sequence_parallel: bool,
    modules: tuple[str, ...] = (),
    element_bytes: int = 2,
    factor: float = 1.0,
) -> int:
    """Activations one layer keeps for backward over ``tokens`` tokens (no full recompute).
    ``factor`` is the one calibration knob, measured / analytic: 1.0 gives the analytic count;
    the estimate passes the backend's LAYER_FACTOR (or the value being fitted)."""
    h, f, heads = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.num_attention_heads
    d_head = h // heads
    kv_local = max(model_cfg.num_query_groups // tp, 1) * d_head
    h_sp = h / tp if sequence_parallel else h
    e = element_bytes
    # layernorm drops both norm outputs, but under Megatron's mlp recompute the MLP's checkpoint
    # keeps its input, the pre-MLP norm's output
    norms = 4 - (("layernorm" in modules) * (1 if "mlp" in modules else 2))
    per_token = e * (norms * h_sp + (2 * h) / tp + 2 * kv_local)
    if "core_attn" not in modules:
        per_token += 4 * heads / tp  # fp32 softmax statistics (log-sum-exp) of flash attention
    if "mlp" not in modules:
        per_token += e * (2 if "swiglu" in modules else 3) * f / tp
    return int(per_token * tokens * factor)


def estimate_memory(
    model_cfg,
    train_cfg,
    parallel_cfg,
    seq_length: int,
    world_size: int,
    gpu_memory_gib: float | None = None,
    *,
    vocab_size: int | None = None,
    gpu: str | None = None,
    grad_reduce_in_fp32: bool = True,
    recompute_modules: tuple[str, ...] | None = None,
    attention_backend: str | None = None,
    logits_block: int | None = DEFAULT_LOGITS_BLOCK,
    overhead_gib: float = DEFAULT_OVERHEAD_GIB,
    cross_entropy: str = "triton",
    layer_factor: float | None = None,
) -> MemoryEstimate:
    """Estimate the per-GPU memory of training ``model_cfg`` with ``train_cfg`` and the layout
    ``parallel_cfg`` on ``world_size`` GPUs at ``seq_length`` tokens per sequence.

    ``gpu_memory_gib`` defaults to the memory of ``gpu`` (a key of ``GPU_SPECS``; default: the
    config's ``train.gpu`` when present, else h100_80gb). ``vocab_size`` defaults to
    ``model_cfg.vocab_size``. ``recompute_modules`` overrides Megatron's selective-recompute
    modules (default: ``train_cfg.recompute_modules`` for train.recompute=selective). ``attention_backend``
    (plugin | te) decides whether the CP-gathered K/V are kept for backward (plugin) or
    re-gathered (te); default: ``model_cfg.attention_backend``, where auto counts as te. Pass the
    resolved backend (``model.builder.resolve_attention_backend``) to estimate what the trainer
    runs, as the start-up check does: ``auto`` is the plugin path there.
    ``logits_block=None`` models an unblocked output layer (all logits of the micro-batch).
    ``cross_entropy``: the loss kernel (``kernels.cross_entropy``; triton, the GPU default, or torch).
    ``layer_factor`` replaces the backend's LAYER_FACTOR (used when fitting it).
    """
    tp, pp, cp = parallel_cfg.tp, parallel_cfg.pp, parallel_cfg.cp
    sp = bool(_get(parallel_cfg, "sequence_parallel", False)) and tp > 1
    if world_size % (tp * pp * cp):
        raise ConfigError(f"tp x pp x cp = {tp * pp * cp} does not divide world size {world_size}")
    dp = world_size // (tp * pp * cp)
    if gpu_memory_gib is None:
        gpu_memory_gib = gpu_spec(gpu or _get(train_cfg, "gpu", None) or "h100_80gb").memory_gib
    vocab_size = vocab_size or _get(model_cfg, "vocab_size")
    if not vocab_size:
        raise ValueError("vocab_size is needed (model.vocab_size is null: pass the tokenizer's)")

    bf16 = _get(train_cfg, "precision", "bf16") == "bf16"
    e = 2 if bf16 else 4
    params = rank_params(model_cfg, vocab_size, tp, pp)
    distopt = bool(_get(parallel_cfg, "distributed_optimizer", False))
    weights = e * params
    grads = (4 if (grad_reduce_in_fp32 or not bf16) else 2) * params
    opt_bytes = 12 if bf16 else 8
    optimizer = opt_bytes * params // (dp * cp if distopt else 1)

    mbs = train_cfg.micro_batch_size
    tokens = mbs * seq_length // cp  # per rank per micro-batch
    micro_batches = max(train_cfg.global_batch_size // (mbs * dp), 1)
    in_flight = min(pp, micro_batches)
    layers = math.ceil(model_cfg.num_layers / pp)

    recompute = _get(train_cfg, "recompute", "none")
    if recompute_modules is None:
        default = TrainConfig().recompute_modules
        recompute_modules = tuple(_get(train_cfg, "recompute_modules", default)) if recompute == "selective" else ()
    unknown = set(recompute_modules) - set(RECOMPUTE_MODULES)
    if unknown:
        raise ValueError(f"recompute_modules {sorted(unknown)} not modelled (known: {RECOMPUTE_MODULES})")
    modules = tuple(recompute_modules) if recompute == "selective" else ()

    h, f = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    d_head = h // model_cfg.num_attention_heads
    kv_local = max(model_cfg.num_query_groups // tp, 1) * d_head
    h_sp = h / tp if sp else h
    backend = attention_backend or _get(model_cfg, "attention_backend", "auto")
    plugin_cp = backend == "plugin" and cp > 1
    if layer_factor is None:
        layer_factor = LAYER_FACTOR["plugin" if backend == "plugin" else "te"]
    kv_gathered_extra = int(e * 2 * kv_local * (cp - 1) * tokens) if plugin_cp else 0  # kept K/V of other ranks
    full_layer = layer_activation_bytes(model_cfg, tokens, tp, sp, (), e, factor=layer_factor) + kv_gathered_extra

    if recompute == "full":
        per_layer = int(e * h_sp * tokens)  # the checkpointed layer input
        recompute_layer = full_layer
    else:
        per_layer = layer_activation_bytes(model_cfg, tokens, tp, sp, modules, e, factor=layer_factor) + kv_gathered_extra
        recompute_layer = 0
    activations = per_layer * layers * in_flight

    vocab_local = _padded_vocab(vocab_size, _get(model_cfg, "make_vocab_size_divisible_by", 128), tp) // tp
    block = tokens if not logits_block else min(logits_block, tokens)
    if cross_entropy not in LOGITS_BYTES_PER_ELEMENT:
        raise ValueError(f"cross_entropy={cross_entropy!r} is not one of {sorted(LOGITS_BYTES_PER_ELEMENT)}")
    weight_grad = (4 + e) * vocab_local * h if cross_entropy == "triton" else 0
    logits = int(LOGITS_BYTES_PER_ELEMENT[cross_entropy] * block * vocab_local + weight_grad + 2 * e * h_sp * tokens)

    kv_gather = 0 if cp == 1 else int(e * 2 * kv_local * cp * tokens * (2 if not plugin_cp else 1))
    workspace = int(e * tokens * (3 * f / tp + 2 * h + (h if sp else 0))) + kv_gather
    layout = (f"tp={tp} pp={pp} cp={cp} dp={dp}{' sp' if sp else ''} recompute={recompute}"
              f"{'(' + ','.join(modules) + ')' if modules else ''} distopt={'on' if distopt else 'off'}")
    return MemoryEstimate(
        weights=weights, grads=grads, optimizer=optimizer, activations=activations,
        recompute_layer=recompute_layer, logits=logits, workspace=workspace,
        overhead=int(overhead_gib * GiB), gpu_memory=int(gpu_memory_gib * GiB), layout=layout,
        info={"params_per_rank": params, "dp": dp, "tokens_per_rank": tokens, "micro_batches": micro_batches,
              "in_flight": in_flight, "layer_activation_gib": full_layer / GiB,
              "saved_per_layer_gib": per_layer / GiB, "seq_length": seq_length, "world_size": world_size},
    )


def _alternatives(model_cfg, train_cfg, parallel_cfg, world_size: int):
    """Single changes that a user can make with one or two overrides."""
    p, t = parallel_cfg, train_cfg
    mp = p.tp * p.pp * p.cp
    if _get(t, "recompute", "none") != "full":
        yield "train.recompute=full", _with(t, recompute="full"), p
    if not _get(p, "distributed_optimizer", False):
        yield "parallel.distributed_optimizer=true", t, _with(p, distributed_optimizer=True)
    for factor in (2, 4, 8):
        if world_size % (mp * factor) == 0:
            yield f"parallel.cp={p.cp * factor}", t, _with(p, cp=p.cp * factor)
    for factor in (2, 4, 8):
        tp = p.tp * factor
        if (world_size % (mp * factor) == 0 and model_cfg.num_attention_heads % tp == 0
                and model_cfg.ffn_hidden_size % tp == 0 and tp <= 8):
            yield f"parallel.tp={tp} parallel.sequence_parallel=true", t, _with(p, tp=tp, sequence_parallel=True)


def _with(cfg, **changes):
    if hasattr(cfg, "__dataclass_fields__"):
        return replace(cfg, **changes)
    from types import SimpleNamespace

    d = {k: getattr(cfg, k) for k in dir(cfg) if not k.startswith("_")}
    d.update(changes)
    return SimpleNamespace(**d)


def check_fits(
    model_cfg, train_cfg, parallel_cfg, seq_length: int, world_size: int, gpu_memory_gib: float | None = None,
    **kwargs,
) -> MemoryEstimate:
    """Return the estimate, or raise ``ConfigError`` (a ValueError) naming the breakdown and the
    single overrides that would fit when the estimate exceeds the GPU's memory by more than
    MARGIN (an estimate between the memory and that margin is returned: ``est.fits`` is False)."""
    est = estimate_memory(model_cfg, train_cfg, parallel_cfg, seq_length, world_size, gpu_memory_gib, **kwargs)
    if not est.refused:
        return est
    fixes = []
    for label, t, p in _alternatives(model_cfg, train_cfg, parallel_cfg, world_size):
        alt = estimate_memory(model_cfg, t, p, seq_length, world_size, gpu_memory_gib, **kwargs)
        if alt.fits:
            fixes.append(f"{label} ({alt.total / GiB:.1f} GiB)")
    hint = ("; fits with: " + "; ".join(fixes)) if fixes else (
        "; no single change fits: combine train.recompute=full with a larger parallel.cp or parallel.tp "
        "(with parallel.sequence_parallel=true), or use more GPUs")
    raise ConfigError(
        f"the layout does not fit in GPU memory at data.seq_length={seq_length}: estimated "
        f"{est}{hint}. See docs/recipe.md (memory table) and megatron_prolong/train/memory.py for the model."
    )
