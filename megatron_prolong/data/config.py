"""Schema of the `data` config group (typed dataclasses; values live in conf/data/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

FORMATS = ("mds", "indexed")


@dataclass
class DomainConfig:
    """One source of the mixture: a folder of MDS shards or a Megatron indexed dataset prefix."""

    name: str = ""
    # MDS: a folder with index.json (or sub-folders with index.json, as ProLong's releases have).
    # indexed: the path prefix of <prefix>.bin / <prefix>.idx.
    # Relative paths are resolved against DataConfig.root.
    path: str = ""
    # Fraction of sampled sequences (normalised over the mixture; must be >= 0, sum > 0).
    share: float = 1.0
    format: str = "mds"  # "mds" | "indexed"
    # Indexed sources only (ProLong's rule for long domains): documents shorter than
    # min_doc_length are skipped, longer ones are cut into pieces of max_doc_length
    # (0 = data.seq_length) and pieces shorter than min_doc_length are dropped.
    # The pieces are then packed into sequences of seq_length with their boundaries kept.
    min_doc_length: int = 0
    max_doc_length: int = 0


def _demo_mixture() -> List[DomainConfig]:
    # ProLong's best long/short ratio (60% long / 40% short), over the synthetic corpus.
    return [
        DomainConfig(name="long", path="long", share=0.6),
        DomainConfig(name="short", path="short", share=0.4),
    ]


@dataclass
class DataConfig:
    root: str = "${run.dir}/data"
    seq_length: int = 1024
    mixture: List[DomainConfig] = field(default_factory=_demo_mixture)
    # Generate the deterministic synthetic demo corpus (domains `long` and `short`) into root
    # when its folders are missing.
    synthetic: bool = True
    synthetic_sequences: int = 96  # per synthetic domain
    # ProLong's reordering: within each gradient-accumulation block, order samples by the
    # sum of squared document lengths (largest first).
    balance_micro_batches: bool = True
    # SFT: every domain must have a `mask` column; loss only where mask == 1 (on the label).
    # Off: a `mask` column is ignored (ProLong trains tuluv2 as plain text in CPT).
    sft: bool = False
    # Sequences shorter than seq_length: error (False) or pad with pad_id, no loss on padding.
    pad_short_sequences: bool = False
    pad_id: int = 0
    # Up-front checks: each shard's index and its first and last sample are checked; with
    # validate_all every sample is decoded and checked once (slow on real data).
    validate_all: bool = False
