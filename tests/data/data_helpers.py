"""Helpers for the data tests: MDS folders written with mosaicml-streaming's own MDSWriter."""

from __future__ import annotations

import numpy as np

def write_mds(path, samples, *, columns=None, size_limit=1 << 16):
    """samples: dicts with input_ids (and indices / mask / domain)."""
    from streaming import MDSWriter

    if columns is None:
        columns = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32"}
        if any("mask" in s for s in samples):
            columns["mask"] = "ndarray:uint8"
        if any("domain" in s for s in samples):
            columns["domain"] = "str"
    with MDSWriter(out=str(path), columns=columns, size_limit=size_limit, compression=None) as w:
        for s in samples:
            w.write(s)
    return str(path)


def packed_samples(n, seq_length, *, seed=0, vocab=258, doc_range=(5, 200), tag=None):
    """n sequences of random documents packed with boundaries; token 0 of every sequence is
    `tag` (if given) so tests can tell domains apart."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ids = rng.integers(0, vocab, size=seq_length, dtype=np.int64).astype(np.uint32)
        cuts = [0]
        while cuts[-1] < seq_length:
            cuts.append(min(seq_length, cuts[-1] + int(rng.integers(*doc_range))))
        idx = np.asarray(list(zip(cuts[:-1], cuts[1:])), dtype=np.uint32)
        if tag is not None:
            ids[0] = tag
        ids[1] = k % vocab  # sample number, for identity checks
        out.append({"input_ids": ids, "indices": idx})
    return out
