"""Tokenizers: the byte-level one (demo, tests; no downloads) or a local Hugging Face folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

# Files that make up a Hugging Face tokenizer folder (whatever the tokenizer class).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    eos_ids: list[int]  # every id that ends generation (eos_id first)
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0-255, then BOS=256 and EOS=257."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    eos_ids = [257]
    pad_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, folder: Path) -> None:
        """Write it as a Hugging Face tokenizer (``tokenizer.json`` for ``tokenizers``): the same ids,
        bytes 0-255 then ``<s>`` = BOS and ``</s>`` = EOS, BOS added in front of a text as in training.
        An export then loads with ``AutoTokenizer`` and generates from a string prompt."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        # Byte-level BPE without merges: one token per byte, through GPT-2's byte-to-character table.
        tok = Tokenizer(models.BPE(vocab={_BYTE_CHARS[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", self.bos_id)])
        assert tok.token_to_id("<s>") == self.bos_id and tok.token_to_id("</s>") == self.eos_id
        folder.mkdir(parents=True, exist_ok=True)
        tok.save(str(folder / "tokenizer.json"))
        special = {"bos_token": "<s>", "eos_token": "</s>"}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
             "model_input_names": ["input_ids", "attention_mask"], **special},
            indent=2))


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable character for each byte (the table byte-level tokenizers use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


_BYTE_CHARS = _byte_chars()


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
        self.pad_id = self._tok.pad_token_id
        # A model snapshot used as the tokenizer folder (Llama-3-8B-Instruct) names more ends of
        # generation in its generation_config.json (<|end_of_text|> and <|eot_id|>).
        gen = Path(path) / "generation_config.json"
        extra = as_id_list(json.loads(gen.read_text()).get("eos_token_id")) if gen.is_file() else []
        self.eos_ids = unique_ids([self.eos_id, *extra])

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


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt as the model sees it, with the tokenizer's special tokens: a Hugging Face tokenizer
    adds its own (Llama-3: BOS), as HELMET's and Hugging Face's pipelines do; the byte tokenizer gets
    BOS, as every training document starts with it (data/synthetic.py, data/prepare.py)."""
    hf = getattr(tokenizer, "hf", None)
    return list(hf(text)["input_ids"]) if hf is not None else [tokenizer.bos_id, *tokenizer.encode(text)]


def as_id_list(value: int | list[int] | None) -> list[int]:
    """A config's ``eos_token_id`` (absent, one id or a list) as a list."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def unique_ids(ids: list[int | None]) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The files of a Hugging Face tokenizer folder that exist (none if it is not a folder)."""
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []


def save_tokenizer_files(src: str | Path, dst: Path) -> list[str]:
    """Copy ``src``'s tokenizer files into ``dst``, with its ``generation_config.json``: the ends of
    generation :class:`HFTokenizer` reads from there. Returns the names copied."""
    files = tokenizer_files(src)
    gen = Path(src) / "generation_config.json"
    dst.mkdir(parents=True, exist_ok=True)
    for f in files + ([gen] if gen.is_file() else []):
        shutil.copy2(f, dst / f.name)
    return sorted(f.name for f in files)


def checkpoint_record(cfg: TokenizerConfig, tok: Tokenizer | None = None) -> dict:
    """What every checkpoint's metadata keeps of its tokenizer: the config and the ids generation
    needs (an export's ``config.json`` / ``generation_config.json``). A Hugging Face tokenizer's
    files are kept beside it, in the checkpoint's ``tokenizer/`` folder (see :func:`save_tokenizer_files`).
    ``tok``: the tokenizer built from ``cfg``, if the caller has it already."""
    tok = tok if tok is not None else build_tokenizer(cfg)
    return {**asdict(cfg), "bos_token_id": tok.bos_id, "eos_token_id": list(tok.eos_ids), "pad_token_id": tok.pad_id}
