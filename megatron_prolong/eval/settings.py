"""``eval.every``: which recall tasks and lengths the in-training suite runs, decided and checked
with the configuration (``python -m megatron_prolong.train`` calls :func:`check_training_eval`
beside ``validate``), so a setting that cannot work stops before anything starts, as one line
that names the key and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_prolong.config import ConfigError, ProLongConfig
from megatron_prolong.eval.rows import EvalInputError
from megatron_prolong.eval.samples import check_tasks, make_samples, minimum_length, read_haystack, too_short
from megatron_prolong.eval.tasks import haystack_words
from megatron_prolong.tokenizer import Tokenizer, build_tokenizer, encode_prompt

#: ``eval.tasks=[]`` (the default): these, those of them whose minimum fits the shortest evaluated
#: length (the demo's 512 byte tokens fit ruler_mk2 but not json_kv)
DEFAULT_TASKS = ("json_kv", "ruler_mk2")


@dataclass
class EvalPlan:
    tasks: list[str]
    lengths: list[int]
    left_out: dict[str, int]  # default tasks that do not fit: their minimum length


def plan_training_eval(cfg: ProLongConfig, tokenizer: Tokenizer) -> EvalPlan:
    """The tasks and lengths of the in-training suite, or a ``ConfigError`` naming the key and the fix."""
    e = cfg.eval
    # model.attention_backend=auto is the plugin (model/builder.py resolve_attention_backend)
    if cfg.model.attention_backend == "te":
        raise ConfigError("eval.every needs model.attention_backend=plugin (generation keeps its KV cache in "
                          "the plugin's core attention); set it, or eval.every=0")
    if cfg.parallel.pp > 1:
        raise ConfigError("eval.every does not support pipeline parallelism (parallel.pp > 1) yet; set eval.every=0")
    if e.samples < 1:
        raise ConfigError(f"eval.samples={e.samples} must be at least 1")
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size={e.batch_size} must be at least 1 (1: one sample at a time)")
    if e.data and not Path(e.data).exists():
        raise ConfigError(f"eval.data={e.data} does not exist; give held-out documents (jsonl or an MDS folder) "
                          "or eval.data=null")
    lengths = list(e.lengths) or [cfg.data.seq_length]
    key = "eval.lengths" if e.lengths else "data.seq_length"
    where = f"eval.lengths={lengths}" if e.lengths else f"data.seq_length={cfg.data.seq_length} (eval.lengths is empty)"
    try:
        haystack, _ = read_haystack(e.haystack_file)
    except EvalInputError as err:
        raise ConfigError(f"eval.haystack_file: {err}") from None
    encode = lambda text: encode_prompt(tokenizer, text)  # noqa: E731
    minimum = lambda task: minimum_length(task, e.samples, encode, e.seed, haystack)  # noqa: E731
    if not e.tasks:
        fits = {t: minimum(t) for t in DEFAULT_TASKS}
        tasks = [t for t, m in fits.items() if m <= min(lengths)]
        if not tasks:
            needs = ", ".join(f"{t} {m}" for t, m in fits.items())
            raise ConfigError(
                f"eval.every={e.every}: no default task fits {where} with this tokenizer (minimum lengths: {needs}); "
                f"set {key} to at least {min(fits.values())}, name eval.tasks, or set eval.every=0")
        return EvalPlan(tasks, lengths, {t: m for t, m in fits.items() if t not in tasks})
    try:
        check_tasks(e.tasks, haystack)
    except EvalInputError as err:
        raise ConfigError(f"eval.tasks: {err}") from None
    for task in e.tasks:
        m = minimum(task)
        short = [n for n in lengths if n < m]
        if short:
            fix = (f"set eval.lengths to at least {m} (and at most data.seq_length={cfg.data.seq_length})"
                   if e.lengths and m <= cfg.data.seq_length else f"raise data.seq_length to at least {m}")
            raise ConfigError(f"eval.tasks={list(e.tasks)} at {where}: {too_short(task, short, m)}; drop {task} "
                              f"from eval.tasks, or {fix}")
    if "ruler_mv" in e.tasks:
        _check_haystack_size(lengths, e.samples, encode, e.seed, haystack)
    return EvalPlan(list(e.tasks), lengths, {})


def _check_haystack_size(lengths: list[int], num: int, encode, seed: int, haystack: str) -> None:
    # Every word is at least one token, so a haystack of as many words as the length cannot run
    # out; a shorter one is tried, at the cost of building the (short) samples twice.
    words = len(haystack_words(haystack))
    for n in lengths:
        if words < n:
            try:
                make_samples("ruler_mv", n, num, encode, seed, haystack)
            except EvalInputError as err:
                raise ConfigError(f"eval.haystack_file: {err}") from None


def check_training_eval(cfg: ProLongConfig) -> None:
    """With ``eval.every`` set: refuse settings that cannot work (a ``ConfigError``) before anything starts."""
    try:
        tokenizer = build_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError(f"eval.every needs the tokenizer: {err}") from None
    plan_training_eval(cfg, tokenizer)
