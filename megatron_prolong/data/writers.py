"""Writers of prepared data: documents packed into fixed-length MDS sequences in ProLong's layout
(`input_ids`, `indices`, `domain`, and `mask` for SFT), or one Megatron indexed document each.
The packing rules are described in megatron_prolong/data/prepare.py."""

from __future__ import annotations

from typing import Optional

import numpy as np

from megatron_prolong.data.mds_format import finish_writer, mds_format


class MDSPacker:
    """Packs documents into sequences of exactly seq_length tokens, written with MDSWriter."""

    def __init__(self, out: str, seq_length: int, domain: str, *, sft: bool, pad_id: int, size_limit: int,
                 bos_id: Optional[int] = None):
        MDSWriter = mds_format().MDSWriter

        columns = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str"}
        if sft:
            columns["mask"] = "ndarray:uint8"
        self.w = MDSWriter(out=out, columns=columns, size_limit=size_limit, compression=None)
        self.s, self.domain, self.sft, self.pad_id, self.bos_id = seq_length, domain, sft, pad_id, bos_id
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.indices: list[tuple[int, int]] = []
        self.fill = 0
        self.sequences = self.documents = self.dropped_tokens = self.truncated = 0

    def _flush(self) -> None:
        ids = np.concatenate(self.ids).astype(np.uint32)
        sample = {"input_ids": ids, "indices": np.asarray(self.indices, dtype=np.uint32).reshape(-1, 2),
                  "domain": self.domain}
        if self.sft:
            sample["mask"] = np.concatenate(self.masks).astype(np.uint8)
        self.w.write(sample)
        self.sequences += 1
        self.ids, self.masks, self.indices, self.fill = [], [], [], 0

    def add(self, ids: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        self.documents += 1
        if self.sft:
            if len(ids) > self.s:  # a conversation is never split: cut to one sequence
                ids, mask = ids[: self.s], mask[: self.s]
                self.truncated += 1
            if self.fill + len(ids) > self.s:
                pad = self.s - self.fill
                self.ids.append(np.full(pad, self.pad_id, dtype=np.int64))
                self.masks.append(np.zeros(pad, dtype=np.uint8))
                self._flush()
            self.indices.append((self.fill, self.fill + len(ids)))
            self.ids.append(ids)
            self.masks.append(mask)
            self.fill += len(ids)
            if self.fill == self.s:
                self._flush()
            return
        while len(ids):  # pre-training: a document continues in the next sequence
            n = min(len(ids), self.s - self.fill)
            self.indices.append((self.fill, self.fill + n))
            self.ids.append(ids[:n])
            self.fill += n
            ids = ids[n:]
            if self.fill == self.s:
                self._flush()
            if len(ids) and self.bos_id is not None and ids[0] != self.bos_id:
                ids = np.concatenate([[self.bos_id], ids])  # re-open the continuation (datatools)

    def close(self) -> None:
        if self.fill:
            if self.sft:
                pad = self.s - self.fill
                self.ids.append(np.full(pad, self.pad_id, dtype=np.int64))
                self.masks.append(np.zeros(pad, dtype=np.uint8))
                self._flush()
            else:
                self.dropped_tokens += self.fill
        finish_writer(self.w)


class IndexedWriter:
    def __init__(self, prefix: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix = prefix
        self.dtype = DType.optimal_dtype(vocab_size)  # int32 above 65,500 tokens
        self.b = IndexedDatasetBuilder(prefix + ".bin", dtype=self.dtype)
        self.documents = self.sequences = self.dropped_tokens = self.truncated = 0

    def add(self, ids: np.ndarray, mask=None) -> None:
        import torch

        self.b.add_item(torch.from_numpy(ids.astype(np.int64)))
        self.b.end_document()
        self.documents += 1

    def close(self) -> None:
        self.b.finalize(self.prefix + ".idx")
