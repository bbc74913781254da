"""Tokenizers: the byte-level one (demo, tests; no downloads) or a local Hugging Face folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0-255, then BOS=256 and EOS=257."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never from a hub)."""

    def __init__(self, path: str) -> None:
        if not (Path(path) / "tokenizer_config.json").is_file() and not (Path(path) / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"tokenizer.path={path!r} is not a Hugging Face tokenizer folder (no tokenizer.json or "
                "tokenizer_config.json); point it at a local copy, e.g. the Llama-3-8B-Instruct snapshot"
            )
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self._tok)
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id

    @property
    def hf(self):
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


@dataclass
class TokenizerConfig:
    kind: str = "byte"  # "byte" | "hf"
    path: str | None = None  # Hugging Face tokenizer folder when kind=hf


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "hf":
        if not cfg.path:
            raise ValueError("tokenizer.kind=hf needs tokenizer.path=<local Hugging Face tokenizer folder>")
        return HFTokenizer(cfg.path)
    raise ValueError(f"tokenizer.kind={cfg.kind!r} is unknown; use 'byte' or 'hf'")
