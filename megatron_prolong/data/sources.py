"""Random access to the sequences of one domain: MDS folders (ProLong's released data) and
Megatron indexed datasets packed online.

Both give `Sample`s: `input_ids` (one packed sequence), `indices` ((start, end) document
boundaries, int64 [n, 2]) and an optional SFT `mask`, each with `where` naming the file and
sample for error messages.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file and the sample."""


@dataclass
class Sample:
    input_ids: np.ndarray
    indices: np.ndarray  # int64 [n, 2]
    mask: Optional[np.ndarray]
    where: str


def check_sample(
    sample: Sample, *, seq_length: int, vocab_size: int, allow_short: bool, need_mask: bool
) -> None:
    """Raise DataError (naming sample.where) when the sample breaks the data contract."""
    ids, where = sample.input_ids, sample.where
    if ids.ndim != 1:
        raise DataError(f"{where}: input_ids has shape {ids.shape}, expected one dimension")
    n = ids.shape[0]
    if n != seq_length and not (allow_short and 0 < n < seq_length):
        raise DataError(
            f"{where}: input_ids has {n} tokens but data.seq_length={seq_length}"
            + ("" if n > seq_length else " (set data.pad_short_sequences=true to pad short ones)")
        )
    if n and ids.dtype.kind not in "ui":
        raise DataError(f"{where}: input_ids has dtype {ids.dtype}, expected integers")
    if n:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = int(np.nonzero((ids < 0) | (ids >= vocab_size))[0][0])
            raise DataError(
                f"{where}: token id {int(ids[bad])} at position {bad} is outside the vocabulary "
                f"(vocab_size={vocab_size})"
            )
    idx = sample.indices
    if idx.size:
        starts, ends = idx[:, 0], idx[:, 1]
        bad = np.nonzero((starts < 0) | (ends > n) | (starts > ends))[0]
        if bad.size:
            s, e = (int(x) for x in idx[bad[0]])
            raise DataError(
                f"{where}: indices pair #{int(bad[0])} ({s}, {e}) lies outside the sequence of "
                f"{n} tokens"
            )
        if np.any(starts[1:] < ends[:-1]):
            k = int(np.nonzero(starts[1:] < ends[:-1])[0][0]) + 1
            raise DataError(
                f"{where}: indices pair #{k} {tuple(int(x) for x in idx[k])} overlaps or precedes "
                f"pair #{k - 1} {tuple(int(x) for x in idx[k - 1])}"
            )
    if need_mask and sample.mask is None:
        raise DataError(f"{where}: no `mask` column, but data.sft=true needs one")
    if sample.mask is not None and need_mask and sample.mask.shape != (n,):
        raise DataError(f"{where}: mask has shape {sample.mask.shape}, expected ({n},)")


def _as_indices(value, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.int64)
        if arr.size % 2:
            raise ValueError(f"{arr.size} numbers, not (start, end) pairs")
        return arr.reshape(-1, 2)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: `indices` is not a list of (start, end) pairs: {e}") from None


class MDSSource:
    """A folder of MDS shards, read with mosaicml-streaming's own shard readers.

    Reads local files directly (random access, no shared memory, no TMPDIR, no remote):
    StreamingDataset's partitioning keys on the global rank, not the data-parallel rank, so the
    mixture sampler does its own partitioning. The folder is either an MDS dataset
    (`index.json` at its top) or a tree of them (ProLong's releases: `book-65536/proc00-64/...`).
    """

    def __init__(self, name: str, path: str) -> None:
        from megatron_prolong.data.mds_format import mds_format

        reader_from_json = mds_format().reader_from_json

        self.name, self.path = name, path
        if not os.path.isdir(path):
            raise DataError(f"domain '{name}': folder {path} does not exist")
        index_files = []
        if os.path.isfile(os.path.join(path, "index.json")):
            index_files = [os.path.join(path, "index.json")]
        else:
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                if "index.json" in filenames:
                    index_files.append(os.path.join(dirpath, "index.json"))
        if not index_files:
            raise DataError(f"domain '{name}': no index.json in {path} or its sub-folders")
        self.shards = []  # (reader, shard file path)
        for index_file in index_files:
            try:
                with open(index_file) as f:
                    obj = json.load(f)
                shard_objs = obj["shards"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{index_file}: unreadable MDS index ({e})") from None
            dirname = os.path.dirname(index_file)
            for k, sobj in enumerate(shard_objs):
                where = f"{index_file}: shard #{k}"
                if not isinstance(sobj, dict) or sobj.get("format") != "mds":
                    fmt = sobj.get("format") if isinstance(sobj, dict) else None
                    raise DataError(f"{where}: format {fmt!r}, expected 'mds'")
                try:
                    reader = reader_from_json(dirname, "", sobj)
                    reader.validate(allow_unsafe_types=False)
                except Exception as e:  # noqa: BLE001 - any malformed entry
                    raise DataError(f"{where}: bad shard entry ({e})") from None
                if "input_ids" not in reader.column_names:
                    raise DataError(
                        f"{where}: columns {reader.column_names} have no `input_ids`"
                    )
                file = os.path.join(dirname, reader.raw_data.basename)
                if not os.path.isfile(file):
                    zipped = reader.zip_data.basename if reader.zip_data else None
                    hint = f" (only the compressed {zipped} is there; decompress it)" if zipped else ""
                    raise DataError(f"{file}: shard file is missing{hint}")
                size = os.path.getsize(file)
                if reader.raw_data.bytes is not None and size != reader.raw_data.bytes:
                    raise DataError(
                        f"{file}: shard has {size} bytes but its index says "
                        f"{reader.raw_data.bytes} (truncated or corrupt)"
                    )
                self.shards.append((reader, file))
        self.offsets = np.cumsum([0] + [r.samples for r, _ in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def get(self, i: int) -> Sample:
        k, local = self.locate(i)
        reader, file = self.shards[k]
        where = f"{file}: sample {local} (domain '{self.name}', sample {i} of the domain)"
        try:
            with np.errstate(all="ignore"):  # garbage sizes overflow in streaming's decoder
                item = reader.get_item(local)
            ids = np.asarray(item["input_ids"])
        except Exception as e:  # noqa: BLE001 - decoding garbage can fail in many ways
            raise DataError(f"{where}: cannot be decoded ({type(e).__name__}: {e})") from None
        if "indices" in item and item["indices"] is not None:
            indices = _as_indices(item["indices"], where)
        else:
            indices = np.asarray([[0, ids.shape[0] if ids.ndim else 0]], dtype=np.int64)
        mask = np.asarray(item["mask"]).reshape(-1) if item.get("mask") is not None else None
        return Sample(ids, indices, mask, where)

    def validation_indices(self, full: bool) -> list[int]:
        if full:
            return list(range(len(self)))
        out = []
        for k, (reader, _) in enumerate(self.shards):
            if reader.samples:
                out += sorted({int(self.offsets[k]), int(self.offsets[k + 1]) - 1})
        return out


class IndexedSource:
    """A Megatron indexed dataset (<prefix>.bin/.idx), documents packed online.

    Documents (Megatron's document_indices; each usually one sequence) are shuffled with a
    seeded permutation; for long domains documents shorter than min_doc_length are skipped and
    longer ones cut into max_doc_length pieces (pieces shorter than min_doc_length dropped);
    pieces are concatenated and cut into sequences of seq_length, so a piece may continue in
    the next sequence; every boundary is kept in `indices`. The final partial sequence is
    dropped.
    """

    def __init__(
        self, name: str, prefix: str, *, seq_length: int, seed: int, min_doc_length: int = 0,
        max_doc_length: int = 0,
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.name, self.prefix, self.seq_length = name, prefix, seq_length
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DataError(f"domain '{name}': indexed dataset file {prefix + ext} does not exist")
        try:
            self.ds = IndexedDataset(prefix, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{prefix}.idx: cannot be read as a Megatron indexed dataset ({e})") from None
        seq_lens = np.asarray(self.ds.sequence_lengths, dtype=np.int64)
        expected = int(seq_lens.sum()) * np.dtype(self.ds.index.dtype).itemsize
        if os.path.getsize(prefix + ".bin") < expected:
            raise DataError(
                f"{prefix}.bin: has {os.path.getsize(prefix + '.bin')} bytes, the index needs {expected}"
            )
        doc_idx = np.asarray(self.ds.document_indices, dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(seq_lens)])
        doc_first_seq = doc_idx[:-1]
        doc_len = cum[doc_idx[1:]] - cum[doc_idx[:-1]]
        maxlen = max_doc_length or seq_length
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 11])
        order = rng.permutation(doc_len.shape[0])
        L = doc_len[order]
        keep = (L >= max(min_doc_length, 1))
        order, L = order[keep], L[keep]
        n_full, rem = L // maxlen, L % maxlen
        n_pieces = n_full + (rem >= max(min_doc_length, 1))
        piece_doc = np.repeat(order, n_pieces)
        first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        piece_off = (np.arange(piece_doc.shape[0]) - first) * maxlen
        piece_len = np.minimum(maxlen, doc_len[piece_doc] - piece_off)
        self.piece_seq = doc_first_seq[piece_doc]  # first Megatron sequence of the document
        self.piece_doc, self.piece_off, self.piece_len = piece_doc, piece_off, piece_len
        self.piece_end = np.cumsum(piece_len)
        total = int(self.piece_end[-1]) if piece_len.size else 0
        self.num_sequences = total // seq_length

    def __len__(self) -> int:
        return self.num_sequences

    def segments(self, j: int):
        """(piece, offset in piece, length) of the pieces that make up packed sequence j."""
        s = self.seq_length
        lo, hi = j * s, (j + 1) * s
        k0 = int(np.searchsorted(self.piece_end, lo, side="right"))
        k1 = int(np.searchsorted(self.piece_end, hi, side="left"))
        out = []
        for k in range(k0, k1 + 1):
            p_start = int(self.piece_end[k] - self.piece_len[k])
            a, b = max(lo, p_start), min(hi, int(self.piece_end[k]))
            if b > a:
                out.append((k, a - p_start, b - a))
        return out

    def get(self, j: int) -> Sample:
        where = f"{self.prefix}.bin: packed sequence {j} (domain '{self.name}')"
        parts, indices, pos = [], [], 0
        try:
            for k, off, n in self.segments(j):
                tokens = self.ds.get(int(self.piece_seq[k]), offset=int(self.piece_off[k]) + off, length=n)
                parts.append(np.asarray(tokens))
                indices.append((pos, pos + n))
                pos += n
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return Sample(ids, np.asarray(indices, dtype=np.int64).reshape(-1, 2), None, where)

    def validation_indices(self, full: bool) -> list[int]:
        n = len(self)
        if full:
            return list(range(n))
        return sorted({0, n - 1}) if n else []
