"""The recall metrics as HELMET computes them (princeton-nlp/HELMET ``utils.py`` and ``data.py``).

- ``substring_exact_match``: the normalised gold answer is a substring of the normalised output;
  the best over gold answers, and over the raw output and its parsed first answer line.
- ``exact_match``: normalised equality, same best-of rule.
- ``ruler_recall``: the fraction of gold strings found in the output, case-insensitive, no other
  normalisation.
Normalisation (DrQA's): lower-case, drop punctuation, drop the articles a/an/the, collapse spaces.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def parse_output(output: str, prefix: str = "Answer:") -> str | None:
    """The text after ``prefix`` up to the end of its line, else the first line (prefix repeats dropped)."""
    for pattern in (re.compile(f"(?:{re.escape(prefix)})(.*)(?:\n|$)", flags=re.IGNORECASE),
                    re.compile(r"(?:^)(.*)(?:\n|$)")):
        m = pattern.search(output)
        if m is not None:
            return re.sub(f"^{re.escape(prefix)}", "", m[1].strip(), flags=re.IGNORECASE).strip()
    return None


def _best(prediction: str, golds: Sequence[str], fn) -> float:
    return max(float(fn(normalize_answer(prediction), normalize_answer(g))) for g in golds)


def qa_metrics(prediction: str, golds: Sequence[str], prefix: str) -> dict[str, float]:
    """exact_match and substring_exact_match, best of the raw output and its parsed answer."""
    candidates = [prediction]
    parsed = parse_output(prediction, prefix)
    if parsed is not None:
        candidates.append(parsed)
    return {
        "exact_match": max(_best(c, golds, lambda p, g: p == g) for c in candidates),
        "substring_exact_match": max(_best(c, golds, lambda p, g: g in p) for c in candidates),
    }


def ruler_recall(prediction: str, golds: Sequence[str]) -> float:
    low = prediction.lower()
    return sum(g.lower() in low for g in golds) / len(golds)
