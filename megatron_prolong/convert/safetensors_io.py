"""Hugging Face safetensors folders as the canonical Megatron tensor stream, and back: read lazily
(one tensor at a time), written in shards as they fill."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_prolong.config import ModelConfig
from megatron_prolong.convert.common import progress
from megatron_prolong.convert.mapping import ConversionError, Shapes, expand, expected_shape, fmt

_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsReader:
    """Tensors of a Hugging Face folder by name, opened lazily (nothing is read until asked for)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = None
        if not files:
            bins = list(self.path.glob("pytorch_model*.bin"))
            raise ConversionError(
                f"{self.path} has no safetensors weights"
                + (" (only pytorch_model*.bin: re-save it with safe_serialization=True)" if bins else "")
            )
        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            if not (self.path / f).is_file():
                raise ConversionError(f"{self.path}: the index names {f}, which is missing")
            h = safe_open(str(self.path / f), framework="pt")
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = f
        if weight_map:
            missing = [k for k in weight_map if k not in self._where]
            if missing:
                raise ConversionError(f"{self.path}: tensors listed in the index are missing, e.g. {missing[:3]}")

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"{self.path} has no tensor {name!r} (an unexpected Llama layout?)")
        return self._handles[self._where[name]].get_tensor(name)


def hf_tensors(reader: SafetensorsReader, model: ModelConfig, vocab_size: int,
               dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The canonical Megatron stream made from HF tensors, layer by layer."""
    shapes = Shapes.of(model, vocab_size)
    used: set[str] = set()
    for e, i in expand(model):
        names = [fmt(n, i) for n in e.hf]
        want_hf = [tuple(x.shape) for x in e.transform.to_hf(torch.empty(expected_shape(e, shapes), device="meta"), shapes)]
        ts = []
        for n, want in zip(names, want_hf):
            t = reader.get(n)
            if tuple(t.shape) != want:
                what = "vocabulary" if e.vocab and t.shape[1:] == want[1:] else "shape"
                raise ConversionError(
                    f"{what} mismatch: {n} has shape {tuple(t.shape)}, but config.json implies {want}"
                )
            ts.append(t.to(dtype))
            used.add(n)
        yield fmt(e.param, i), e.transform.to_mcore(ts, shapes)
    extra = sorted(n for n in reader.names() - used
                   if not n.endswith(_IGNORED_HF_SUFFIXES) and not (n == "lm_head.weight" and not model.untie_embeddings))
    if extra:
        raise ConversionError(
            f"the checkpoint has {len(extra)} tensors a Llama model does not use, e.g. {extra[:3]}; "
            "unsupported architecture variant"
        )


class SafetensorsWriter:
    """Writes tensors into shards of at most ``max_shard_bytes`` as they come, then the index."""

    def __init__(self, out: Path, max_shard_bytes: int) -> None:
        self.out, self.max = out, max_shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + n > self.max:
            self.flush()
        self.buf[name] = t.contiguous().clone()
        self.buf_bytes += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        name = f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.buf, str(self.out / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / self.shards[0][0], self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for k, (tmp, keys) in enumerate(self.shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp, self.out / final)
            names.append(final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_hf(out: Path, tensors: Iterator[tuple[str, torch.Tensor]], model: ModelConfig, vocab_size: int,
             dtype: torch.dtype, max_shard_bytes: int, desc: str) -> None:
    """Canonical stream -> HF safetensors shards in ``out``."""
    shapes = Shapes.of(model, vocab_size)
    by_param = {fmt(e.param, i): (e, i) for e, i in expand(model)}
    writer = SafetensorsWriter(out, max_shard_bytes)
    bar = progress(len(by_param), desc)
    done = set()
    for name, t in tensors:
        e, i = by_param[name]
        for hf_name, x in zip(e.hf, e.transform.to_hf(t, shapes)):
            writer.add(fmt(hf_name, i), x.to(dtype))
        done.add(name)
        bar.update(1)
    bar.close()
    if done != set(by_param):
        raise ConversionError(f"missing tensors: {sorted(set(by_param) - done)[:3]}")
    writer.finish()
