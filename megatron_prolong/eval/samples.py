"""Recall samples at the lengths asked for, each as long as it can be at or below its target.

HELMET's recall data come from RULER's generators, which fill the haystack up to the budget: the
largest haystack whose prompt plus generation budget fits the length. So here: a sample's
haystack is the largest that fits, the next size up measured not to, so the sample lands less
than one haystack step (one key-value pair, needle, essay word or noise line) below its target,
whatever the tokenizer and the length. A task's smallest sample does not depend on the length
(:func:`megatron_prolong.eval.tasks.render`), so every length from the task's minimum up works;
a shorter one is refused, naming the minimum and the nearest lengths that work, before any model
is loaded.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_prolong.eval.rows import EvalInputError
from megatron_prolong.eval.tasks import DEPTHS, MAX_NEW_TOKENS, MIN_UNITS, TASKS, UNITS, haystack_words, render

Encode = Callable[[str], list[int]]


@dataclass
class Sample:
    task: str
    length: int  # target: prompt + generation budget
    index: int
    depth: int  # percent, of the (first) queried needle
    units: int  # haystack size, in the task's UNITS
    prompt: str
    input_ids: list[int]
    answers: list[str]
    answer_prefix: str
    max_new_tokens: int


def read_haystack(path: str | Path | None) -> tuple[str | None, dict | None]:
    """The user's prose for ruler_mv and what to record about it (path, size, SHA-256)."""
    if not path:
        return None, None
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--haystack-file {p} does not exist; give a plain-text prose file (e.g. essays)")
    text = p.read_text(errors="replace")
    return text, {"path": str(p.resolve()), "words": len(text.split()),
                  "sha256": hashlib.sha256(text.encode()).hexdigest()}


def check_tasks(tasks: Sequence[str], haystack_text: str | None) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalInputError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if "ruler_mv" in tasks and not (haystack_text or "").strip():
        raise EvalInputError("ruler_mv needs an essay haystack: pass --haystack-file PROSE.txt (eval.haystack_file)")


def depth_of(index: int, num: int) -> int:
    """Sample ``index`` of ``num``: spread evenly over RULER's 40 depths (cycling past 40 samples)."""
    return DEPTHS[(index * len(DEPTHS)) // num] if num < len(DEPTHS) else DEPTHS[index % len(DEPTHS)]


def units_text(task: str, n: int) -> str:
    return f"{n} {UNITS[task]}{'' if n == 1 else 's'}"


class _Candidate:
    """Sample ``index`` of ``task`` at any haystack size, each size built and tokenized once."""

    def __init__(self, task: str, index: int, num: int, encode: Encode, seed: int, words: list[str] | None):
        self.task, self.index, self.depth = task, index, depth_of(index, num)
        self.encode, self.seed, self.words = encode, seed, words
        self.built: dict[int, tuple] = {}

    def tokens(self, units: int) -> int:
        """Prompt plus generation budget, in tokens."""
        if units not in self.built:
            prompt, answers, prefix = render(self.task, self.seed, self.index, self.depth, units, self.words)
            self.built[units] = (prompt, self.encode(prompt), answers, prefix)
        return len(self.built[units][1]) + MAX_NEW_TOKENS[self.task]

    def sample(self, units: int, length: int) -> Sample:
        prompt, ids, answers, prefix = self.built[units]
        self.built.clear()  # the other sizes' prompts: up to a few times the target length each
        return Sample(self.task, length, self.index, self.depth, units, prompt, ids, answers, prefix,
                      MAX_NEW_TOKENS[self.task])


def minimum_length(task: str, num: int, encode: Encode, seed: int, haystack_text: str | None = None) -> int:
    """The shortest length at which all ``num`` samples of ``task`` can be made with this tokenizer
    and seed: the longest of their smallest samples (``MIN_UNITS``)."""
    check_tasks([task], haystack_text)
    words = haystack_words(haystack_text)
    return max(_Candidate(task, i, num, encode, seed, words).tokens(MIN_UNITS[task]) for i in range(num))


def nearest_lengths(minimum: int) -> list[int]:
    """The lengths that work nearest the refused ones: the minimum and the power of two above it."""
    return sorted({minimum, 1 << (minimum - 1).bit_length()})


def too_short(task: str, lengths: Sequence[int], minimum: int) -> str:
    """The refusal of ``lengths`` below ``task``'s minimum, with the nearest lengths that work."""
    asked = ", ".join(map(str, lengths))
    return (f"{task}: {asked} tokens {'is' if len(lengths) == 1 else 'are'} below the task's minimum of {minimum} "
            f"tokens with this tokenizer (its smallest sample: the instructions, {units_text(task, MIN_UNITS[task])} "
            f"and {MAX_NEW_TOKENS[task]} tokens to generate); every length from {minimum} up works (the nearest: "
            f"{', '.join(map(str, nearest_lengths(minimum)))})")


def make_samples(task: str, length: int, num: int, encode: Encode, seed: int,
                 haystack_text: str | None = None) -> list[Sample]:
    """``num`` samples of ``task``, each as long as it can be at or below ``length`` tokens (prompt
    plus generation budget): less than one haystack step below it."""
    check_tasks([task], haystack_text)
    words = haystack_words(haystack_text)
    candidates = [_Candidate(task, i, num, encode, seed, words) for i in range(num)]
    smallest = max(c.tokens(MIN_UNITS[task]) for c in candidates)
    if smallest > length:
        raise EvalInputError(too_short(task, [length], smallest))
    cap = len(words) if task == "ruler_mv" else None
    out: list[Sample] = []
    guess = None
    for c in candidates:
        units = _largest_fitting(c.tokens, length, MIN_UNITS[task], guess, cap)
        if units == cap:
            raise EvalInputError(
                f"ruler_mv: the haystack file's {cap} words all fit in {length} tokens; give a longer prose file "
                f"(about {math.ceil(cap * length / c.tokens(cap))} words or more)")
        out.append(c.sample(units, length))
        guess = units  # the next sample's size is about the same
    return out


def _largest_fitting(tokens: Callable[[int], int], length: int, lo: int, guess: int | None, cap: int | None) -> int:
    """The largest haystack size n whose ``tokens(n) <= length``, with n + 1 measured not to fit (or
    n = ``cap``); ``lo`` fits. Sizes grow about linearly, so probes are interpolated; every other
    probe in the bracket bisects, in case random keys' token counts mislead the interpolation. No
    probe goes past ``length`` units: every unit is at least one token."""
    base, base_size = lo, tokens(lo)
    lo_size = base_size
    hi = hi_size = None
    top = min(length, cap) if cap is not None else length
    probe = guess if guess is not None and guess > lo else lo + 1
    interpolate = True
    while (hi is None or hi - lo > 1) and lo < top:
        size = tokens(min(probe, top))
        if size <= length:
            lo, lo_size = min(probe, top), size
        else:
            hi, hi_size = min(probe, top), size
        if hi is None:
            slope = (lo_size - base_size) / (lo - base)
            # one past the estimate, so that an exact estimate brackets the answer at once
            probe = lo + math.ceil((length - lo_size) / slope) + 1 if slope >= 0.5 else 2 * lo
        elif interpolate:
            probe = min(max(lo + round((length - lo_size) * (hi - lo) / (hi_size - lo_size)), lo + 1), hi - 1)
            interpolate = False
        else:
            probe = (lo + hi) // 2
            interpolate = True
    return lo


def check_lengths(lengths: Sequence[int], max_length: int) -> None:
    """Refuse lengths beyond what the model takes (its trained seq_length unless told otherwise)."""
    if not lengths or min(lengths) < 1:
        raise EvalInputError(f"--lengths {', '.join(map(str, lengths))}: give positive target lengths in tokens")
    too_long = [n for n in lengths if n > max_length]
    if too_long:
        raise EvalInputError(
            f"length(s) {', '.join(map(str, too_long))} exceed the model's length {max_length} (its trained "
            "seq_length); drop them or pass --max-length to evaluate beyond the trained length on purpose")


def default_tasks(candidates: Sequence[str], lengths: Sequence[int], num: int, encode: Encode, seed: int,
                  haystack_text: str | None) -> tuple[list[str], dict[str, str]]:
    """The tasks of ``candidates`` that work at every length asked, and why each other one is left
    out. Defaults leave a task out where an explicit ``--tasks`` / ``eval.tasks`` would be refused:
    the user did not ask for it, and the suite should run from its defaults (ruler_mv needs an
    essay; a task whose minimum is above the shortest length would refuse the whole run)."""
    tasks: list[str] = []
    left_out: dict[str, str] = {}
    for task in candidates:
        if task == "ruler_mv" and not (haystack_text or "").strip():
            left_out[task] = "needs an essay haystack: --haystack-file PROSE.txt (eval.haystack_file)"
            continue
        minimum = minimum_length(task, num, encode, seed, haystack_text)
        if minimum > min(lengths):
            left_out[task] = f"needs {minimum} tokens or more"
        else:
            tasks.append(task)
    return tasks, left_out


def build_samples(tasks: Sequence[str], lengths: Sequence[int], num: int, encode: Encode, seed: int,
                  haystack_text: str | None, max_length: int) -> list[Sample]:
    """Every sample, or a clear error before any is built (unknown task, a length the model cannot
    take, a length below a task's minimum)."""
    check_tasks(tasks, haystack_text)
    check_lengths(lengths, max_length)
    refused = []
    for task in tasks:
        minimum = minimum_length(task, num, encode, seed, haystack_text)
        short = [n for n in lengths if n < minimum]
        if short:
            beyond = (f" (more than the model's length {max_length}: drop {task}, or pass --max-length to evaluate "
                      "beyond the trained length on purpose)" if minimum > max_length else "")
            refused.append(too_short(task, short, minimum) + beyond)
    if refused:
        raise EvalInputError("; ".join(refused))
    return [s for task in tasks for n in lengths for s in make_samples(task, n, num, encode, seed, haystack_text)]
