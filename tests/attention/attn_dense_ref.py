"""Tiny, obviously-correct float64 dense-mask attention used as the test oracle."""

from __future__ import annotations

import random

import torch


def doc_ids_from_lengths(lengths: list[int]) -> list[int]:
    ids = []
    for d, n in enumerate(lengths):
        ids += [d] * n
    return ids


def dense_mask(lengths: list[int]) -> torch.Tensor:
    """mask[i, j] = token j is visible to token i: same document and j <= i."""
    ids = doc_ids_from_lengths(lengths)
    s = len(ids)
    m = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(i + 1):
            m[i, j] = ids[i] == ids[j]
    return m


def dense_attention(q, k, v, rows_lengths, scale=None):
    """q [s, b, hq, d], k/v [s, b, hkv, d] -> [s, b, hq*d]; float64, repeated K/V, full S x S."""
    s, b, hq, d = q.shape
    g = hq // k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    outs = []
    for r in range(b):
        m = dense_mask(rows_lengths[r])
        sc = torch.einsum("ihd,jhd->hij", q[:, r], kk[:, r]) * scale
        sc = sc.masked_fill(~m, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", sc.softmax(-1), vv[:, r]))
    return torch.stack(outs, dim=1).reshape(s, b, hq * d)


def random_lengths(rng: random.Random, s: int, mean: float) -> list[int]:
    out, left = [], s
    while left:
        n = min(left, max(1, int(rng.expovariate(1.0 / mean))))
        out.append(n)
        left -= n
    return out


# Named layouts (per row lengths), s = 64 so CP 2 and 4 (chunks of 16 and 8) apply.
S = 64
LAYOUTS = {
    "one_doc": [[64]],
    "crossing_chunks": [[3, 13, 1, 30, 17]],  # boundaries off every chunk edge; docs span ranks
    "one_token_docs": [[1, 1, 1, 5, 1, 40, 1, 1, 13]],
    "many_tiny": [[2] * 32],
    "all_ones": [[1] * 64],
    "batch_mixed": [[64], [7, 9, 48], [1] * 8 + [56]],
    "random": [random_lengths(random.Random(7), 64, 9), random_lengths(random.Random(8), 64, 4)],
}
