"""What a run prints around its steps: a few lines at the start, one summary line at the end.

Megatron-Core and its optional dependencies print about 40 lines before step 1 (configuration
dumps, one line per parameter of each gradient bucket, "Transformer Engine / Apex not installed"
warnings). ``log.verbose=false`` (the default) keeps them out; ``log.verbose=true`` shows them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from megatron_prolong.config import ProLongConfig
from megatron_prolong.te.linear import uses_te_linears
from megatron_prolong.train.metrics import format_eta

# Loggers whose INFO lines are configuration dumps and notices, not progress.
QUIET_LOGGERS = ("megatron", "torch.utils.cpp_extension")


def quiet_libraries(verbose: bool) -> None:
    """Megatron's notices at debug level, unless ``log.verbose``: call before Megatron is imported."""
    if verbose:
        return
    for name in QUIET_LOGGERS:  # their warnings are deprecation notices; errors still show
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"megatron\.")  # missing TE / Apex, deprecations
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")  # single-process load notes
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)


def start_lines(cfg: ProLongConfig, params: int, layout: str, backend: str, memory: str, start_step: int,
                micro_batches: int) -> list[str]:
    """The model, layout, attention, memory estimate, data, run folder, and the steps to go."""
    m, total = cfg.model, cfg.train.steps
    linears = ("te" if uses_te_linears(m.linear, backend) else "local") + (f", fp8 {m.fp8}" if m.fp8 != "none" else "")
    steps = (f"training {total} steps" if start_step == 0 else
             f"resuming at step {start_step}: {total - start_step} steps to go (of {total})")
    return [
        f"model {m.name}: {params / 1e6:.2f}M parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads / {m.num_query_groups} KV groups), {cfg.data.seq_length} tokens per sequence",
        f"layout {layout}, attention backend {backend} (kernel {m.attention.kernel}), linears {linears}, {micro_batches} "
        f"micro-batches/step; memory estimate {memory}",
        f"data {cfg.data.root}; run folder {cfg.run.dir}",
        f"{steps}",
    ]


def summary_line(cfg: ProLongConfig, *, start_step: int, step: int, tokens: int, seconds: float, loss: float,
                 checkpoint: Path) -> str:
    """The end of a run: what it did, and where its checkpoint and logs are."""
    logs = (f"TensorBoard: tensorboard --logdir {Path(cfg.run.dir) / 'tensorboard'}" if cfg.log.tensorboard
            else f"metrics: {Path(cfg.run.dir) / 'metrics.jsonl'}")
    resumed = f" (resumed at step {start_step})" if start_step else ""
    return (f"done: {step - start_step} steps{resumed} in {format_eta(seconds)}, {tokens:,} tokens, final loss "
            f"{loss:.4f}; checkpoint {checkpoint}; {logs}")
