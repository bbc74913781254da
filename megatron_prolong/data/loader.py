"""The training data stream: a domain mixture, sampled exactly and deterministically, split
over data-parallel ranks, length-balanced into micro-batches, resumable exactly.

Sampling. Each optimizer step takes a block of G = dp_size x micro_batch_size x
num_micro_batches sequences. The block's domains come from a deterministic largest-deficit
schedule: slot n goes to the domain with the largest `share x (n+1) - drawn so far`, so after n
draws every domain has been drawn share x n times to within one. The slots of a block are then
shuffled with a generator seeded by (seed, step), and DP rank r takes slots [r L, (r+1) L) with
L = micro_batch_size x num_micro_batches, so DP ranks are disjoint and TP/CP ranks of one replica
(same dp_rank) read the same samples. The k-th draw of a domain with N sequences is sample
perm_e[k mod N] with e = k div N and perm_e a permutation seeded by (seed, domain name, e).
The whole state is (step, per-domain draw counts): resuming from state_dict() gives the same
next samples as an uninterrupted run.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch

from megatron_prolong.data.config import FORMATS, DataConfig
from megatron_prolong.data.sources import DataError, IndexedSource, MDSSource, Sample, check_sample
from megatron_prolong.data.synthetic import SYNTHETIC_DOMAINS, synthetic_corpus_exists, write_synthetic_corpus

STATE_VERSION = 1


def resolve_path(root: str, path: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(os.path.expanduser(root), path)


def check_mixture(cfg: DataConfig) -> np.ndarray:
    """Validate the mixture's keys; return the normalised shares."""
    if not cfg.mixture:
        raise ValueError("data.mixture is empty")
    names = set()
    shares = []
    for i, d in enumerate(cfg.mixture):
        key = f"data.mixture[{i}]"
        if not d.name:
            raise ValueError(f"{key}.name is empty")
        if d.name in names:
            raise ValueError(f"{key}.name={d.name!r} appears twice in data.mixture")
        names.add(d.name)
        if not d.path:
            raise ValueError(f"{key}.path is empty (domain {d.name!r})")
        if d.format not in FORMATS:
            raise ValueError(f"{key}.format={d.format!r} (domain {d.name!r}); use one of {FORMATS}")
        share = float(d.share)
        if not np.isfinite(share) or share < 0:
            raise ValueError(f"{key}.share={d.share} (domain {d.name!r}) must be a finite number >= 0")
        if d.min_doc_length < 0 or d.max_doc_length < 0:
            raise ValueError(f"{key}.min_doc_length/max_doc_length (domain {d.name!r}) must be >= 0")
        shares.append(share)
    total = sum(shares)
    if total <= 0:
        raise ValueError(f"data.mixture shares sum to {total}; at least one share must be > 0")
    return np.asarray(shares, dtype=np.float64) / total


def sequence_cost(cu: np.ndarray) -> int:
    """ProLong's balancing key: the sum of squared document lengths."""
    d = np.diff(cu).astype(np.int64)
    return int((d * d).sum())


def build_row(sample: Sample, *, seq_length: int, sft: bool, pad_id: int):
    """tokens, labels, loss_mask, document boundaries (cu, from 0 to seq_length) of one sample."""
    s = seq_length
    ids = sample.input_ids.astype(np.int64, copy=False)
    n = ids.shape[0]
    tokens = np.full(s, pad_id, dtype=np.int64)
    tokens[:n] = ids
    labels = np.full(s, pad_id, dtype=np.int64)
    labels[:-1] = tokens[1:]
    idx = sample.indices
    idx = idx[idx[:, 1] > idx[:, 0]] if idx.size else idx
    if idx.size == 0:
        idx = np.asarray([[0, n]], dtype=np.int64)
    # Documents: the listed ones plus any gap (and the padding tail) as its own segment.
    cuts = np.unique(np.concatenate([[0, n, s], idx[:, 0], idx[:, 1]]))
    # covered[i]: token i belongs to a listed document (pairs do not overlap: checked).
    delta = np.zeros(s + 2, dtype=np.int64)
    np.add.at(delta, idx[:, 0], 1)
    np.add.at(delta, idx[:, 1], -1)
    covered = np.cumsum(delta)[: s + 1] > 0
    loss = np.ones(s, dtype=np.float32)
    loss[-1] = 0.0
    starts = cuts[1:-1]  # every document start except 0
    loss[starts - 1] = 0.0  # the label is the first token of a document
    loss[:-1] *= covered[1:s]  # label outside any listed document, or padding
    if sft and sample.mask is not None:
        m = np.zeros(s, dtype=np.float32)
        m[:n] = sample.mask[:n] != 0
        loss[:-1] *= m[1:]  # loss where the label token has mask == 1
    return tokens, labels, loss, cuts.astype(np.int64)


def collate(rows: list, domains: list[int], seq_length: int) -> dict[str, torch.Tensor]:
    max_docs = max(len(r[3]) - 1 for r in rows)
    cu = np.full((len(rows), max_docs + 1), seq_length, dtype=np.int32)
    for i, r in enumerate(rows):
        cu[i, : len(r[3])] = r[3]
    return {
        "tokens": torch.from_numpy(np.stack([r[0] for r in rows])),
        "labels": torch.from_numpy(np.stack([r[1] for r in rows])),
        "loss_mask": torch.from_numpy(np.stack([r[2] for r in rows])),
        "cu_seqlens": torch.from_numpy(cu),
        "domain": torch.tensor(domains, dtype=torch.int64),
    }


class MixtureLoader:
    def __init__(
        self,
        cfg: DataConfig,
        *,
        vocab_size: int,
        seed: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        num_micro_batches: int,
    ) -> None:
        if "${" in str(cfg.root):
            raise ValueError(f"data.root={cfg.root!r} is not resolved")
        if cfg.seq_length < 2:
            raise ValueError(f"data.seq_length={cfg.seq_length} must be >= 2")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} / dp_size={dp_size} are inconsistent")
        if micro_batch_size < 1 or num_micro_batches < 1:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} and num_micro_batches={num_micro_batches} must be >= 1"
            )
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.seed = int(seed)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch_size, self.num_micro_batches = micro_batch_size, num_micro_batches
        self.local_batch = micro_batch_size * num_micro_batches
        self.global_batch = self.local_batch * dp_size
        self.shares = check_mixture(cfg)
        self.domain_names = [d.name for d in cfg.mixture]
        root = str(cfg.root)

        if cfg.synthetic and any(
            d.format == "mds" and d.path in SYNTHETIC_DOMAINS for d in cfg.mixture
        ) and not synthetic_corpus_exists(root, cfg.seq_length):
            write_synthetic_corpus(root, cfg.seq_length, num_sequences=cfg.synthetic_sequences)

        self.sources = []
        for i, d in enumerate(cfg.mixture):
            path = resolve_path(root, d.path)
            if d.format == "mds":
                src = MDSSource(d.name, path)
            else:
                src = IndexedSource(
                    d.name, path, seq_length=cfg.seq_length, seed=self.seed,
                    min_doc_length=d.min_doc_length, max_doc_length=d.max_doc_length,
                )
            if len(src) == 0 and self.shares[i] > 0:
                raise DataError(f"domain '{d.name}' ({path}) has no sequences but share {d.share}")
            self.sources.append(src)
        self.validate(full=cfg.validate_all)

        self._step = 0
        self._counts = np.zeros(len(self.sources), dtype=np.int64)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    # ---- checks -------------------------------------------------------------------------------
    def _check(self, sample: Sample) -> None:
        check_sample(
            sample, seq_length=self.cfg.seq_length, vocab_size=self.vocab_size,
            allow_short=self.cfg.pad_short_sequences, need_mask=self.cfg.sft,
        )

    def validate(self, full: bool = False) -> None:
        """Check each shard's first and last sample (every sample when full)."""
        for src in self.sources:
            for i in src.validation_indices(full):
                self._check(src.get(i))

    # ---- sampling -----------------------------------------------------------------------------
    def _block(self, step: int, counts: np.ndarray):
        """Domains and per-domain draw numbers of the G slots of `step`; updates counts."""
        G = self.global_batch
        total = int(counts.sum())
        doms = np.empty(G, dtype=np.int64)
        draws = np.empty(G, dtype=np.int64)
        for k in range(G):
            deficit = self.shares * (total + k + 1) - counts
            d = int(np.argmax(deficit))
            doms[k], draws[k] = d, counts[d]
            counts[d] += 1
        order = np.random.default_rng([self.seed, 7, step]).permutation(G)
        return doms[order], draws[order]

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(d)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        name_key = zlib.crc32(self.domain_names[d].encode())
        perm = np.random.default_rng([self.seed, 1, name_key, epoch]).permutation(len(self.sources[d]))
        self._perm_cache[d] = (epoch, perm)
        return perm

    def sample_index(self, d: int, draw: int) -> int:
        n = len(self.sources[d])
        return int(self._perm(d, draw // n)[draw % n])

    def next_assignment(self) -> list[tuple[int, int]]:
        """(domain, sample index) of this rank's samples for the next step (advances the state)."""
        doms, draws = self._block(self._step, self._counts)
        self._step += 1
        lo = self.dp_rank * self.local_batch
        return [
            (int(d), self.sample_index(int(d), int(j)))
            for d, j in zip(doms[lo : lo + self.local_batch], draws[lo : lo + self.local_batch])
        ]

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This DP rank's num_micro_batches micro-batches for the next optimizer step."""
        s = self.cfg.seq_length
        items = []
        for d, i in self.next_assignment():
            sample = self.sources[d].get(i)
            self._check(sample)
            row = build_row(sample, seq_length=s, sft=self.cfg.sft, pad_id=self.cfg.pad_id)
            items.append((row, d))
        if self.cfg.balance_micro_batches:
            # ProLong: largest attention work first (stable, so ties keep the sampled order).
            items.sort(key=lambda it: -sequence_cost(it[0][3]))
        b = self.micro_batch_size
        return [
            collate([r for r, _ in items[k : k + b]], [d for _, d in items[k : k + b]], s)
            for k in range(0, len(items), b)
        ]

    # ---- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "counts": [int(c) for c in self._counts],
            "domain_names": list(self.domain_names),
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}")
        if list(state["domain_names"]) != self.domain_names:
            raise ValueError(
                f"data loader state is for domains {state['domain_names']}, but data.mixture has "
                f"{self.domain_names}"
            )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data loader state has seed {state['seed']}, this run has {self.seed}")
        self._step = int(state["step"])
        self._counts = np.asarray(state["counts"], dtype=np.int64)
        self._perm_cache.clear()

    @property
    def step(self) -> int:
        return self._step

    def realised_shares(self) -> dict[str, float]:
        total = max(int(self._counts.sum()), 1)
        return {n: float(c) / total for n, c in zip(self.domain_names, self._counts)}
