"""Balance of the CP splits on ProLong's layouts: max / mean per-rank causal work (the keys each
query sees, summed over a rank's queries; 1.0 = every rank the same work), and the share of the
busiest rank's work that is against remote keys (rectangles: gathered K/V, small pieces), CPU
only.

    PYTHONPATH=. python tools/cp_balance.py

Layouts: stage 1 (64K tokens, CP = 2): one document; short documents packed (document lengths
exponential with mean 2K / 8K). Stage 2 (512K, CP = 8): one document; 8 documents of 64K;
short documents packed. Random: lengths mixing a log-normal body (median 1.5K) with 20% of
documents uniform up to the row length, and exponential lengths of random means, CP 2 / 4 / 8.
"""

from __future__ import annotations

import math
import random

from megatron_prolong.attention import DocumentLayout, balance, pieces, rank_work, split_for

K = 1024


def exponential(seed: int, s: int, mean: float) -> list[int]:
    rng, out, left = random.Random(seed), [], s
    while left:
        n = min(left, max(1, int(rng.expovariate(1.0 / mean))))
        out.append(n)
        left -= n
    return out


def mixed(seed: int, s: int) -> list[int]:
    rng, out, left = random.Random(seed), [], s
    while left:
        n = int(rng.lognormvariate(math.log(1500), 1.2)) if rng.random() < 0.8 else rng.randint(1, s)
        n = min(left, max(1, n))
        out.append(n)
        left -= n
    return out


def layouts(random_count: int = 12) -> list[tuple[str, int, list[int]]]:
    rows = [
        ("stage 1: one 64K document", 2, [64 * K]),
        ("stage 1: short documents, mean 2K", 2, exponential(1, 64 * K, 2048)),
        ("stage 1: short documents, mean 8K", 2, exponential(2, 64 * K, 8192)),
        ("stage 2: one 512K document", 8, [512 * K]),
        ("stage 2: 8 x 64K documents", 8, [64 * K] * 8),
        ("stage 2: short documents, mean 2K", 8, exponential(3, 512 * K, 2048)),
        ("stage 2: short documents, mean 8K", 8, exponential(4, 512 * K, 8192)),
    ]
    for i in range(random_count):
        rng = random.Random(100 + i)
        cp, s = rng.choice([2, 4, 8]), rng.choice([64, 128, 512]) * K
        if i % 2:
            lengths, what = mixed(i, s), "mixed"
        else:
            mean = rng.choice([512, 2048, 8192, 32768])
            lengths, what = exponential(i, s, mean), f"exp. mean {mean}"
        rows.append((f"random {i}: {s // K}K, {what}", cp, lengths))
    return rows


def remote_share(layout: DocumentLayout, split) -> float:
    """Of the busiest rank's causal work, the part against keys before its own run of each
    document (the rectangles, which need the gathered K/V)."""
    work = rank_work(layout, split)
    r = max(range(split.cp_size), key=work.__getitem__)
    rect = sum((p.q1 - p.q0) * (p.k1 - (p.q1 - p.q0) - p.k0) for p in pieces(layout, split, r))
    return rect / max(1, work[r])


def table(random_count: int = 12) -> list[dict]:
    out = []
    for name, cp, lengths in layouts(random_count):
        layout = DocumentLayout.from_lengths([lengths])
        row = {"layout": name, "cp": cp, "docs": len(lengths)}
        for method in ("zigzag", "spread", "balanced"):
            split = split_for(layout, cp, method)
            row[method] = balance(layout, split)
            row[f"{method}_remote"] = remote_share(layout, split)
        out.append(row)
    return out


def main() -> None:
    print("| layout | CP | documents | zigzag | spread | balanced (default) | remote work: spread | "
          "balanced |\n|---|---|---|---|---|---|---|---|")
    for r in table():
        print(f"| {r['layout']} | {r['cp']} | {r['docs']} | {r['zigzag']:.3f} | {r['spread']:.3f} | "
              f"{r['balanced']:.3f} | {r['spread_remote']:.2f} | {r['balanced_remote']:.2f} |")


if __name__ == "__main__":
    main()
