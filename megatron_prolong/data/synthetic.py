"""A small deterministic synthetic corpus in ProLong's MDS layout (the demo's data).

Two domains, written with mosaicml-streaming's own MDSWriter:
- `long`: one document per sequence (BOS, then a random text-like passage repeated until the
  sequence is full), so a model can lower its loss both from word statistics and by copying
  from far back in its context;
- `short`: short documents (BOS ... EOS) packed into sequences, boundaries kept in `indices`.

Every sample has `input_ids` (uint32, exactly seq_length), `indices` ((start, end) pairs,
uint32, shape [n, 2]) and `domain` (str), like prolong-data-64K.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from megatron_prolong.tokenizer import ByteTokenizer

SYNTHETIC_DOMAINS = ("long", "short")

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their has been would more when if so no "
    "model long context data train token sequence attention memory book code river stone light "
    "window garden market letter story number question answer value key needle haystack"
).split()


def _sentence(rng: np.random.Generator) -> str:
    n = int(rng.integers(4, 12))
    # Zipf-like word frequencies: learnable unigram statistics.
    ranks = np.minimum(rng.zipf(1.3, size=n), len(_WORDS)) - 1
    words = [_WORDS[r] for r in ranks]
    words[0] = words[0].capitalize()
    return " ".join(words) + ". "


def _text(rng: np.random.Generator, min_bytes: int, max_bytes: int) -> str:
    target = int(rng.integers(min_bytes, max_bytes + 1))
    out = ""
    while len(out) < target:
        out += _sentence(rng)
    return out[:target]


def _long_sample(rng: np.random.Generator, tok: ByteTokenizer, seq_length: int):
    passage = tok.encode(_text(rng, 96, 320))
    ids = [tok.bos_id]
    while len(ids) < seq_length:
        ids.extend(passage)
    ids = np.asarray(ids[:seq_length], dtype=np.uint32)
    return ids, np.asarray([[0, seq_length]], dtype=np.uint32)


def _short_sample(rng: np.random.Generator, tok: ByteTokenizer, seq_length: int):
    ids: list[int] = []
    indices = []
    while len(ids) < seq_length:
        hi = max(16, min(300, seq_length // 3))
        doc = [tok.bos_id] + tok.encode(_text(rng, min(16, hi), hi)) + [tok.eos_id]
        doc = doc[: seq_length - len(ids)]  # the last document is cut to fit (boundary kept)
        indices.append((len(ids), len(ids) + len(doc)))
        ids.extend(doc)
    return np.asarray(ids, dtype=np.uint32), np.asarray(indices, dtype=np.uint32)


MARKER = "synthetic.json"


def synthetic_corpus_exists(root: str, seq_length: int | None = None) -> bool:
    """True when both domains are there. With seq_length, a corpus made for another sequence
    length raises a clear error instead (its samples would all fail the length check)."""
    if not all(os.path.isfile(os.path.join(root, d, "index.json")) for d in SYNTHETIC_DOMAINS):
        return False
    if seq_length is not None:
        try:
            with open(os.path.join(root, MARKER)) as f:
                made = json.load(f)
        except (OSError, ValueError):
            return True
        if made.get("seq_length") != seq_length:
            raise ValueError(
                f"data.root={root} holds the synthetic corpus prepared for data.seq_length="
                f"{made.get('seq_length')} (recorded in its {MARKER}), but data.seq_length={seq_length}: "
                "this run folder was used with another sequence length. Use a new run.dir, or delete "
                f"{root} to prepare the data again"
            )
    return True


def write_synthetic_corpus(
    root: str,
    seq_length: int,
    *,
    num_sequences: int = 96,
    seed: int = 0,
    size_limit: int = 1 << 17,
    overwrite: bool = False,
) -> None:
    """Write domains `long` and `short` under root (each num_sequences sequences of seq_length).

    Deterministic for (seq_length, num_sequences, seed). Each domain folder is written to a
    temporary folder and renamed into place, so concurrent callers (several ranks) are safe and
    a folder that exists is complete. Existing folders are kept unless overwrite=True.
    """
    from megatron_prolong.data.mds_format import finish_writer, mds_format

    MDSWriter = mds_format().MDSWriter

    if seq_length < 2:
        raise ValueError(f"data.seq_length={seq_length} is too small for the synthetic corpus")
    tok = ByteTokenizer()
    synthetic_corpus_exists(root, seq_length)  # refuses a corpus made for another length (kept as it is)
    os.makedirs(root, exist_ok=True)
    for d_idx, domain in enumerate(SYNTHETIC_DOMAINS):
        final = os.path.join(root, domain)
        if os.path.isfile(os.path.join(final, "index.json")) and not overwrite:
            continue
        rng = np.random.default_rng([seed, d_idx, seq_length])
        tmp = tempfile.mkdtemp(prefix=f".{domain}-", dir=root)
        out = os.path.join(tmp, domain)
        columns = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str"}
        w = MDSWriter(out=out, columns=columns, size_limit=size_limit, compression=None)
        try:
            for _ in range(num_sequences):
                if domain == "long":
                    ids, idx = _long_sample(rng, tok, seq_length)
                else:
                    ids, idx = _short_sample(rng, tok, seq_length)
                w.write({"input_ids": ids, "indices": idx, "domain": domain})
        except BaseException:
            w.finish()  # what leaving the writer's ``with`` block did
            raise
        finish_writer(w)
        if overwrite and os.path.exists(final):
            shutil.rmtree(final)
        try:
            os.rename(out, final)
        except OSError:
            # Another process renamed its copy first; its copy is identical.
            if not os.path.isfile(os.path.join(final, "index.json")):
                raise
        shutil.rmtree(tmp, ignore_errors=True)
    marker = {"seq_length": seq_length, "num_sequences": num_sequences, "seed": seed}
    tmp_marker = os.path.join(root, f".{MARKER}.{os.getpid()}")
    with open(tmp_marker, "w") as f:
        json.dump(marker, f)
    os.replace(tmp_marker, os.path.join(root, MARKER))
