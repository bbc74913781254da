"""Raw text -> tokenized, packed MDS in ProLong's layout, or Megatron indexed datasets.

Inputs: jsonl files (`.jsonl`, `.jsonl.gz`), parquet files, or a Hugging Face dataset saved with
`save_to_disk` (a folder); a folder of jsonl/parquet files is read file by file in sorted order.

Pre-training text (one document per record, field --text-key): tokenized with BOS/EOS per
document. MDS output packs documents into sequences of exactly --seq-length tokens (`input_ids`
uint32, `indices` (start, end) pairs uint32 [n, 2], `domain`); a document that does not fit
continues in the next sequence, re-opened with BOS, boundaries kept; the last partial sequence is
dropped. Length bucketing (--bucket, ProLong's packing as in princeton-nlp's datatools): while a
document has >= min(thresholds) tokens, its first T tokens (T the largest threshold it reaches,
default 524288 / 65536) go to `<name>-T` and the rest, re-opened with BOS, goes round again; a
final remainder below the smallest threshold is dropped. Documents that start below the smallest
threshold go to `<name>` (packed). A T-token piece with T > --seq-length is cut into
sequence-length parts (one per sequence). Indexed output writes one Megatron document per
document (whole, into the bucket of its length) and leaves cutting and packing to the loader
(DomainConfig.min_doc_length / max_doc_length).

SFT (--sft): records with `messages` ([{role, content}, ...]) are rendered with the tokenizer's
chat template (the byte tokenizer has a simple built-in one); `mask` = 1 exactly on the tokens
of assistant turns (their content and end-of-turn tokens, not the role header); conversations
are packed whole into --seq-length sequences and the rest of a sequence is padding (mask 0,
outside `indices`), like prolong-ultrachat-64K.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import multiprocessing
from typing import Iterator, Optional

import numpy as np

from megatron_prolong.data.writers import IndexedWriter, MDSPacker

DEFAULT_THRESHOLDS = (524288, 65536)


# ---- input ---------------------------------------------------------------------------------

def _is_hf_disk(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        out = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            out += [os.path.join(dirpath, f) for f in sorted(filenames)
                    if f.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet"))]
        return out
    return [path]


def iter_records(paths: list[str]) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of the inputs, in a deterministic order."""
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input {path} does not exist")
        if _is_hf_disk(path):
            import datasets

            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                splits = [(f"{path}[{k}]", ds[k]) for k in sorted(ds)]
            else:
                splits = [(path, ds)]
            for name, split in splits:
                for i, rec in enumerate(split):
                    yield f"{name} row {i}", rec
            continue
        for file in _files(path):
            if file.endswith(".parquet"):
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(file)
                i = 0
                for batch in pf.iter_batches(batch_size=1024):
                    for rec in batch.to_pylist():
                        yield f"{file} row {i}", rec
                        i += 1
            else:
                opener = gzip.open if file.endswith(".gz") else open
                with opener(file, "rt", encoding="utf-8") as f:
                    for line_no, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{file} line {line_no}: not valid JSON ({e})") from None
                        if not isinstance(rec, dict):
                            raise ValueError(f"{file} line {line_no}: not a JSON object (one record per line)")
                        yield f"{file} line {line_no}", rec


# ---- tokenization (in worker processes) ----------------------------------------------------

_TOK = None
_OPTS: dict = {}


def load_tokenizer(spec: str):
    from megatron_prolong.tokenizer import ByteTokenizer, HFTokenizer

    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


def _init_worker(spec: str, opts: dict) -> None:
    global _TOK, _OPTS
    _TOK, _OPTS = load_tokenizer(spec), opts


def _byte_chat(tok, messages):
    """Built-in template for the byte tokenizer: BOS, then per message `<|role|>\\n` content EOS."""
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        head = tok.encode(f"<|{m['role']}|>\n")
        body = tok.encode(m["content"]) + [tok.eos_id]
        ids += head + body
        mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


def _hf_chat(tok, messages, where):
    hf = tok.hf
    if not getattr(hf, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; SFT data needs one")

    def render(msgs, gen):
        out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    full = render(messages, False)
    mask = [0] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:k], True)  # up to and including the assistant header
        upto = render(messages[: k + 1], False)
        if upto[: len(prefix)] != prefix or full[: len(upto)] != upto:
            raise ValueError(
                f"{where}: the chat template does not render message {k} as an extension of the "
                "previous ones; cannot locate the assistant tokens"
            )
        for i in range(len(prefix), len(upto)):
            mask[i] = 1
    return full, mask


def _tokenize(item):
    where, rec = item
    o, tok = _OPTS, _TOK
    if o["sft"]:
        msgs = rec.get(o["messages_key"])
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError(f"{where}: `{o['messages_key']}` is not a list of {{role, content}} messages")
        if o["byte"]:
            ids, mask = _byte_chat(tok, msgs)
        else:
            ids, mask = _hf_chat(tok, msgs, where)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)
    text = rec.get(o["text_key"])
    if not isinstance(text, str):
        raise ValueError(f"{where}: no string field `{o['text_key']}`")
    ids = tok.encode(text)
    if o["bos"] and tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    if o["eos"] and tok.eos_id is not None:
        ids = ids + [tok.eos_id]
    return np.asarray(ids, dtype=np.int64), None


def bucket_of(length: int, thresholds: tuple[int, ...]) -> Optional[int]:
    for t in sorted(thresholds, reverse=True):
        if length >= t:
            return t
    return None


def prepare(args: argparse.Namespace) -> dict:
    tok = load_tokenizer(args.tokenizer)
    vocab = tok.vocab_size
    if args.format == "mds" and vocab > 2**32:
        raise ValueError("vocabulary too large for uint32 input_ids")
    if args.sft and args.format != "mds":
        raise ValueError("--sft writes MDS (the prolong-ultrachat-64K layout); use --format mds")
    thresholds = tuple(args.thresholds) if args.bucket and not args.sft else ()
    os.makedirs(args.output, exist_ok=True)
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    bos_id = None if (args.no_bos or args.sft) else tok.bos_id
    writers: dict = {}

    def writer(t: Optional[int]):
        if t not in writers:
            name = args.name if t is None else f"{args.name}-{t}"
            path = os.path.join(args.output, name)
            if args.format == "mds":
                if os.path.exists(path) and os.listdir(path):
                    raise FileExistsError(f"output folder {path} exists and is not empty")
                writers[t] = MDSPacker(path, args.seq_length, args.domain or args.name, sft=args.sft,
                                       pad_id=pad_id, size_limit=args.size_limit, bos_id=bos_id)
            else:
                writers[t] = IndexedWriter(path, vocab)
        return writers[t]

    opts = {"sft": args.sft, "messages_key": args.messages_key, "text_key": args.text_key,
            "bos": not args.no_bos, "eos": not args.no_eos, "byte": args.tokenizer == "byte"}
    records = iter_records(args.inputs)
    if args.limit:
        import itertools

        records = itertools.islice(records, args.limit)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    stats = {"documents": 0, "tokens": 0, "dropped_remainder_tokens": 0}
    if args.workers > 1:
        # spawn: forking a process that holds threads (torch, Rust tokenizers) can deadlock.
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.tokenizer, opts))
        results = pool.imap(_tokenize, records, chunksize=16)
    else:
        pool = None
        _init_worker(args.tokenizer, opts)
        results = map(_tokenize, records)
    try:
        for ids, mask in tqdm(results, desc="tokenizing", unit="doc", disable=args.quiet, file=sys.stderr):
            if ids.size and int(ids.max()) >= vocab:
                raise ValueError(f"token id {int(ids.max())} >= vocab size {vocab}")
            stats["documents"] += 1
            stats["tokens"] += int(ids.size)
            if not thresholds or len(ids) < min(thresholds):
                writer(None).add(ids, mask)
            elif args.format == "indexed":
                writer(bucket_of(len(ids), thresholds)).add(ids)
            else:
                while len(ids) >= min(thresholds):
                    t = bucket_of(len(ids), thresholds)
                    piece, ids = ids[:t], ids[t:]
                    if t <= args.seq_length:
                        writer(t).add(piece)
                    else:  # one sequence-length part per sequence
                        for k in range(0, t, args.seq_length):
                            writer(t).add(piece[k : k + args.seq_length])
                    if len(ids) and bos_id is not None:
                        ids = np.concatenate([[bos_id], ids])
                stats["dropped_remainder_tokens"] += len(ids)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    out = {}
    for t, w in writers.items():
        w.close()
        name = args.name if t is None else f"{args.name}-{t}"
        out[name] = {"documents": w.documents, "sequences": w.sequences,
                     "dropped_tokens": w.dropped_tokens, "truncated": w.truncated}
    stats["outputs"] = out
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Tokenize raw text (jsonl / parquet / HF save_to_disk) into packed MDS in ProLong's "
        "layout or Megatron indexed datasets.",
    )
    p.add_argument("inputs", nargs="+", help="jsonl/parquet files or folders, or a save_to_disk folder")
    p.add_argument("--output", required=True, help="output folder (domain folders / prefixes go inside)")
    p.add_argument("--name", required=True, help="output domain name (folder or prefix)")
    p.add_argument("--domain", default=None, help="value of the `domain` column (default: --name)")
    p.add_argument("--tokenizer", required=True, help="'byte' or a local Hugging Face tokenizer folder")
    p.add_argument("--format", choices=("mds", "indexed"), default="mds")
    p.add_argument("--seq-length", type=int, default=65536)
    p.add_argument("--text-key", default="text")
    p.add_argument("--messages-key", default="messages")
    p.add_argument("--sft", action="store_true", help="conversations with a chat template; mask on assistant tokens")
    p.add_argument("--bucket", action="store_true", help="length bucketing (documents >= each threshold apart)")
    p.add_argument("--thresholds", type=int, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument("--no-bos", action="store_true")
    p.add_argument("--no-eos", action="store_true")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--size-limit", type=int, default=1 << 26, help="MDS shard size in bytes")
    p.add_argument("--limit", type=int, default=0, help="read at most this many records (0: all)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.seq_length < 2:
        raise SystemExit("--seq-length must be >= 2")
    stats = prepare(args)
    if not args.quiet:
        print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main()
