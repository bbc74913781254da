"""Typed configuration schema: one small dataclass per component, composed by Hydra.

The dataclasses are the schema (registered in Hydra's ConfigStore); YAML under ``conf/`` holds the
values. ``validate`` checks everything that can be checked before any process group starts and
names the offending key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from megatron_prolong.attention.config import AttentionConfig
from megatron_prolong.te.linear import FP8_CHOICES, LINEAR_CHOICES, validate_fp8, validate_te_linears
from megatron_prolong.te.thd import validate_cp_comm_type, validate_te_version
from megatron_prolong.data.config import DataConfig
from megatron_prolong.tokenizer import TokenizerConfig


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 256
    ffn_hidden_size: int = 704
    num_attention_heads: int = 8
    num_query_groups: int = 2
    vocab_size: int | None = None  # None: the tokenizer's vocabulary
    make_vocab_size_divisible_by: int = 128
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings: bool = True
    rope_base: float = 500_000.0
    rope_positions: str = "continuous"  # continuous | per_document
    rope_scaling: str = "none"  # none | llama3 (Llama-3.1 frequency scaling)
    rope_scaling_factor: float = 8.0
    rope_interpolation_factor: float | None = None  # linear position interpolation
    attention_backend: str = "auto"  # auto (= plugin, the faster: docs/benchmarks.md) | plugin | te
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # the plugin backend's kernels, CP split
    # the plugin backend's linears: local (Megatron's) | te (TE's fused norm + linear; the te backend has them always)
    linear: str = "local"
    fp8: str = "none"  # none | delayed | tensorwise: TE's linears in FP8 (model.linear=te or the te backend)


@dataclass
class TrainConfig:
    steps: int = 60
    global_batch_size: int = 8
    micro_batch_size: int = 2
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # floor of the cosine schedule as a fraction of lr
    min_lr: float | None = None  # absolute floor; overrides min_lr_ratio when set
    warmup_fraction: float = 0.1
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    precision: str = "bf16"  # bf16 | fp32 (bf16 keeps fp32 master weights)
    recompute: str = "none"  # none | selective | full
    # what train.recompute=selective recomputes: swiglu (the SwiGLU output, from fc1's output) and
    # layernorm (the two RMSNorm outputs, from their inputs): elementwise passes, the plugin path's;
    # core_attn or mlp (Megatron-Core's: the attention core / the whole MLP, GEMMs included)
    recompute_modules: list[str] = field(default_factory=lambda: ["swiglu", "layernorm"])
    loss_block_size: int = 2048  # output layer + loss in blocks of this many tokens; 0: all logits at once
    max_skipped_steps_in_row: int = 5  # non-finite loss or gradient norm: skip, stop after this many in a row
    gpu: str = "h100_80gb"  # for the memory check and MFU: a key of megatron_prolong.train.flops.GPU_SPECS
    memory_check: str = "error"  # error | warn | off: refuse (or warn about) layouts estimated not to fit


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    cp_comm_type: str = "all_gather"  # TE backend: p2p | all_gather | a2a | a2a+p2p
    hierarchical_cp_sizes: list[int] | None = None
    overlap_grad_reduce: bool = False  # reduce DP gradients bucket by bucket during backward
    # A collective waiting this long on a dead or hung peer fails and the rank exits; also the most a
    # caught SIGTERM waits for the next step boundary (megatron_prolong/parallel/lifetime.py).
    timeout_minutes: float = 10.0


@dataclass
class KernelConfig:
    """Fused kernels (docs/benchmarks.md, "The plugin's layer"): ``auto`` fuses where CUDA is
    available; the unfused path (``torch`` / ``unfused`` / ``foreach``) is what CPU runs use."""

    swiglu: str = "auto"  # auto | fused | unfused: Megatron's fused SwiGLU (bias_activation_fusion)
    rope: str = "auto"  # auto | triton | torch: RoPE on q and k, one Triton pass each (plugin backend)
    cross_entropy: str = "auto"  # auto | triton | torch: the blockwise loss's cross entropy
    optimizer: str = "auto"  # auto | fused | foreach: torch AdamW's implementation (no TE / Apex)


@dataclass
class CheckpointConfig:
    save_interval: int = 20  # steps; 0 disables periodic saves (the last step is always saved)
    load: str | None = None  # checkpoint to start a new run from (stage transitions)
    resume_step: int | None = None  # resume this run from this saved step, not the latest (a damaged one)
    load_optimizer: bool = True
    keep_last: int | None = None  # keep the newest N checkpoints (None: keep all) ...
    keep_every: int | None = None  # ... plus every checkpoint whose step is a multiple of this


@dataclass
class LogConfig:
    interval: int = 1
    tensorboard: bool = True
    verbose: bool = False  # also Megatron's configuration dumps and notices (train/console.py)


@dataclass
class EvalConfig:
    """Long-context evaluation during training (megatron_prolong.eval.in_training)."""

    every: int = 0  # steps between evaluations; 0: off
    # recall tasks (eval/tasks.py TASKS); empty: json_kv and ruler_mk2, those that fit the shortest length
    tasks: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # target lengths; empty: data.seq_length
    samples: int = 4  # per task and length
    data: str | None = None  # held-out documents (jsonl or MDS) for the position-wise loss; None: skip it
    max_sequences: int = 8  # of eval.data
    haystack_file: str | None = None  # prose for ruler_mv
    seed: int = 0
    batch_size: int = 8  # samples of one length decoded together (fewer where GPU memory is short)


@dataclass
class RunConfig:
    name: str = "demo"
    dir: str = "outputs/${run.name}"


@dataclass
class ProLongConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="prolong_schema", node=ProLongConfig)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} must be > 0")


KERNEL_CHOICES = {
    "swiglu": ("auto", "fused", "unfused"),
    "rope": ("auto", "triton", "torch"),
    "cross_entropy": ("auto", "triton", "torch"),
    "optimizer": ("auto", "fused", "foreach"),
}


RECOMPUTE_MODULES = ("swiglu", "layernorm", "core_attn", "mlp")
PLUGIN_RECOMPUTE = ("swiglu", "layernorm")  # the plugin path's own (model/released.py); the others Megatron-Core's


def _recompute_modules(t: TrainConfig, m: ModelConfig) -> None:
    if t.recompute != "selective":
        return
    mods = list(t.recompute_modules)
    bad = [x for x in mods if x not in RECOMPUTE_MODULES]
    if bad or not mods:
        raise ConfigError(f"train.recompute_modules={mods}: choose one or more of {list(RECOMPUTE_MODULES)}")
    if "swiglu" in mods and "mlp" in mods:
        raise ConfigError("train.recompute_modules: 'mlp' recomputes the whole MLP, 'swiglu' part of it; keep one")
    own = [x for x in mods if x in PLUGIN_RECOMPUTE]
    if own and m.attention_backend == "te":
        raise ConfigError(f"train.recompute_modules: {own} is the plugin path's layer; with "
                          "model.attention_backend=te use [core_attn] or [mlp]")
    if own and m.linear == "te":
        # the norms are inside TE's fused norm + linear, and TE's linears may save their own (FP8)
        # copy of an input, which a released tensor would not free
        raise ConfigError(f"train.recompute_modules: {own} rebuilds tensors Megatron's linears keep; with "
                          "model.linear=te use [core_attn] or [mlp]")


def _te_linears(cfg: ProLongConfig) -> None:
    m, p = cfg.model, cfg.parallel
    tokens = cfg.data.seq_length * cfg.train.micro_batch_size // p.cp // (p.tp if p.sequence_parallel else 1)
    dims = {"model.hidden_size": m.hidden_size, "model.hidden_size / parallel.tp": m.hidden_size // p.tp,
            "model.ffn_hidden_size / parallel.tp": m.ffn_hidden_size // p.tp,
            "key/value width (model.num_query_groups x head size) / parallel.tp":
                max(m.num_query_groups // p.tp, 1) * (m.hidden_size // m.num_attention_heads),
            "tokens per rank (data.seq_length x train.micro_batch_size / cp, / tp with sequence parallelism)": tokens}
    try:
        validate_te_linears(m.linear, m.attention_backend)
        validate_fp8(m.fp8, m.linear, m.attention_backend, cfg.train.precision, dims)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate(cfg: ProLongConfig, world_size: int) -> None:
    """Fail before any process group starts; every message names the key."""
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    for key, value in [
        ("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.cp", p.cp),
        ("train.steps", t.steps), ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size), ("train.lr", t.lr),
        ("data.seq_length", d.seq_length), ("model.rope_base", m.rope_base),
        ("model.num_layers", m.num_layers), ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_query_groups", m.num_query_groups), ("parallel.timeout_minutes", p.timeout_minutes),
    ]:
        _positive(key, value)
    _choice("model.rope_positions", m.rope_positions, ("continuous", "per_document"))
    _choice("model.rope_scaling", m.rope_scaling, ("none", "llama3"))
    _choice("model.attention_backend", m.attention_backend, ("auto", "plugin", "te"))
    _choice("model.linear", m.linear, LINEAR_CHOICES)
    _choice("model.fp8", m.fp8, FP8_CHOICES)
    try:
        m.attention.check("model.attention")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _choice("train.precision", t.precision, ("bf16", "fp32"))
    _choice("train.recompute", t.recompute, ("none", "selective", "full"))
    _recompute_modules(t, m)
    _choice("train.lr_decay_style", t.lr_decay_style, ("cosine", "linear", "constant"))
    _choice("train.memory_check", t.memory_check, ("error", "warn", "off"))
    for key, allowed in KERNEL_CHOICES.items():
        _choice(f"kernels.{key}", getattr(cfg.kernels, key), allowed)
    if cfg.tokenizer.kind == "hf" and not cfg.tokenizer.path:
        raise ConfigError(
            "tokenizer.path is not set: tokenizer.kind=hf needs a local Hugging Face tokenizer folder, "
            "e.g. tokenizer.path=/models/Meta-Llama-3-8B-Instruct"
        )
    if t.loss_block_size < 0:
        raise ConfigError(f"train.loss_block_size={t.loss_block_size} must be >= 0 (0 turns blocking off)")
    if not 0 <= t.warmup_fraction < 1:
        raise ConfigError(f"train.warmup_fraction={t.warmup_fraction} must be in [0, 1)")

    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tp x parallel.pp x parallel.cp = {p.tp} x {p.pp} x {p.cp} = {model_parallel} "
            f"does not divide the world size {world_size}; choose sizes whose product divides it, or "
            f"start a multiple of {model_parallel} processes: torchrun --nproc_per_node {model_parallel} -m "
            f"megatron_prolong.train ... (on Slurm: srun -n {model_parallel}, or the slurm/ launchers)"
        )
    dp = world_size // model_parallel
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups}"
        )
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} does not divide model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_query_groups % p.tp and p.tp % m.num_query_groups:
        raise ConfigError(
            f"parallel.tp={p.tp} and model.num_query_groups={m.num_query_groups}: one must divide the other"
        )
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if m.num_layers % p.pp:
        raise ConfigError(f"parallel.pp={p.pp} does not divide model.num_layers={m.num_layers}")
    if p.cp > 1 and d.seq_length % (2 * p.cp):
        raise ConfigError(
            f"data.seq_length={d.seq_length} is not divisible by 2 x parallel.cp = {2 * p.cp}; context "
            "parallelism splits each sequence into 2 x cp load-balanced chunks"
        )
    try:
        validate_cp_comm_type(p.cp_comm_type, p.cp, max(m.num_attention_heads // p.tp, 1),
                              max(m.num_query_groups // p.tp, 1), p.hierarchical_cp_sizes)
    except ValueError as err:
        raise ConfigError(f"parallel.cp_comm_type: {err}") from None
    if m.attention_backend == "te":
        try:
            validate_te_version(p.cp_comm_type, p.cp)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _te_linears(cfg)
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.sequence_parallel and d.seq_length // p.cp % p.tp:
        raise ConfigError(
            f"parallel.sequence_parallel: data.seq_length / cp = {d.seq_length // p.cp} is not divisible by parallel.tp={p.tp}"
        )
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x "
            f"data-parallel size = {t.micro_batch_size} x {dp} = {per_step}"
        )
    too_long = [n for n in cfg.eval.lengths if n > d.seq_length]
    if cfg.eval.every < 0 or (cfg.eval.every and too_long):
        raise ConfigError(f"eval.every={cfg.eval.every} must be >= 0" if cfg.eval.every < 0 else
                          f"eval.lengths {too_long} exceed the model's length {d.seq_length} (data.seq_length)")
    if not math.isfinite(t.lr):
        raise ConfigError(f"train.lr={t.lr} is not finite")
