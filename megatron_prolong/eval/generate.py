"""Greedy generation with a KV cache on the Megatron model, in any TP/CP layout.

The prompt is prefilled through the training forward (document-masked attention, RoPE positions
from the layout, the zigzag CP split); every layer's core attention keeps its K/V shard
(:mod:`megatron_prolong.eval.kv_cache`). Then one token at a time goes through the same model
against the cache until an EOS id or ``max_new_tokens``. Every rank of a model replica computes
the same tokens (TP argmax over the vocabulary shards, CP merge by log-sum-exp), so no
broadcast is needed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prolong import inference
from megatron_prolong.eval.kv_cache import CachedPackedSeqParams, KVCache
from megatron_prolong.eval.model import (
    forward_hidden, output_logits, packed_line, vocab_parallel_argmax, vocab_parallel_logprobs,
)
from megatron_prolong.eval.rows import EvalInputError


@dataclass
class Generation:
    output_ids: list[int]
    logprobs: list[float]  # log p of each generated token (greedy: the maximum)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stats: dict = field(default_factory=dict)


class Generator:
    """Greedy decoding for one loaded GPTModel (``inference.load_model``) on this rank."""

    def __init__(self, gpt, vocab_size: int, rope_mode: str, eos_ids: Sequence[int], max_length: int) -> None:
        from megatron.core import parallel_state

        self.gpt = gpt
        self.vocab_size = vocab_size
        self.rope_mode = rope_mode
        self.eos_ids = set(int(i) for i in eos_ids)
        self.max_length = max_length
        self.device = next(gpt.parameters()).device
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_size = parallel_state.get_context_parallel_world_size()

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.max_length:
            raise EvalInputError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's length "
                f"{self.max_length} (the checkpoint's seq_length); shorten the input, lower --max-new-tokens, "
                "or pass --max-length to evaluate beyond the trained length on purpose")

    def _next_token(self, hidden: torch.Tensor) -> tuple[int, float]:
        logits = output_logits(self.gpt, hidden)[:, 0]  # [1, V / tp]
        token = vocab_parallel_argmax(logits, self.vocab_size, self.tp_group)
        lp = vocab_parallel_logprobs(logits, token, self.vocab_size, self.tp_group)
        return int(token[0]), float(lp[0])

    @torch.no_grad()
    def generate(self, tokens: Sequence[int], max_new_tokens: int, indices=None) -> Generation:
        """Greedy continuation of the last document of ``tokens`` (``indices``: optional packing)."""
        if not tokens:
            raise EvalInputError("empty prompt: generation needs at least one token")
        self.check_length(len(tokens), max_new_tokens)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        line = packed_line(tokens, indices, self.vocab_size, self.rope_mode, self.device)
        n = line.length
        doc = line.packed.layout.doc_ids[0]
        valid = (doc[line.index] == doc[n - 1])[:, None]  # [s_local, 1]: the last document, no padding
        cache = KVCache(valid, max_new_tokens, self.cp_group if self.cp_size > 1 else None)
        packed = CachedPackedSeqParams(qkv_format="sbhd", layout=line.packed.layout,
                                       positions=line.packed.positions, kv_cache=cache)
        hidden = forward_hidden(self.gpt, line.ids, packed)  # [s_local, 1, h]
        here = (line.index == n - 1).nonzero().flatten()
        last = hidden[here[0]:here[0] + 1] if here.numel() else torch.zeros_like(hidden[:1])
        if self.cp_size > 1:  # only the rank holding the last prompt token has its hidden state
            dist.all_reduce(last, group=self.cp_group)
        token, lp = self._next_token(last)
        sync()
        prefill_s = time.perf_counter() - start
        out, lps = [token], [lp]
        position = int(line.packed.positions[here[0], 0]) + 1 if here.numel() else 0
        if self.cp_size > 1:
            pos = torch.tensor([position], device=self.device)
            dist.all_reduce(pos, group=self.cp_group)
            position = int(pos)
        cache.decoding = True
        start = time.perf_counter()
        while len(out) < max_new_tokens and token not in self.eos_ids:
            ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
            step = CachedPackedSeqParams(qkv_format="sbhd", layout=None,
                                         positions=torch.tensor([[position]], device=self.device), kv_cache=cache)
            hidden = forward_hidden(self.gpt, ids, step)
            cache.steps += 1
            position += 1
            token, lp = self._next_token(hidden)
            out.append(token)
            lps.append(lp)
        sync()
        decode_s = time.perf_counter() - start
        return Generation(out, lps, prefill_s, decode_s,
                          {"prompt_tokens": n, "cache_bytes_per_rank": cache.memory_bytes()})


def generate_file(checkpoint: str | Path, input_path: str | Path, output_path: str | Path, *,
                  max_new_tokens: int, tp: int = 1, cp: int = 1, dtype: str | None = None,
                  max_length: int | None = None, eos: Sequence[int] | None = None) -> int:
    """Greedy outputs for every line (``input_ids`` or ``prompt``); rank 0 writes ``output_path``."""
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.eval.model import eos_ids, load_tokenizer
    from megatron_prolong.eval.rows import map_rows, read_lines, write_rows
    from megatron_prolong.tokenizer import encode_prompt

    if max_new_tokens < 1:
        raise EvalInputError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    rows = read_lines(input_path, keys=("input_ids", "prompt"))
    tokenizer = load_tokenizer(checkpoint)
    stop = list(eos) if eos is not None else eos_ids(checkpoint, tokenizer)

    def prompt_ids(row: dict) -> list[int]:
        return [int(t) for t in row["input_ids"]] if "input_ids" in row else encode_prompt(tokenizer, row["prompt"])

    with inference.megatron_session(ParallelConfig(tp=tp, cp=cp)) as topo:
        gpt, meta = inference.load_model(checkpoint, ParallelConfig(tp=tp, cp=cp), dtype)
        gen = Generator(gpt, int(meta["vocab_size"]), meta["model"].get("rope_positions", "continuous"), stop,
                        max_length or int(meta["seq_length"]))
        ids_of = {k: prompt_ids(row) for k, row in enumerate(rows)}
        for k, ids in ids_of.items():  # refuse before any generation starts
            try:
                gen.check_length(len(ids), max_new_tokens)
            except EvalInputError as err:
                raise EvalInputError(f"{input_path}: line {k + 1}: {err}") from err
        index = {id(row): k for k, row in enumerate(rows)}

        def run(row: dict) -> dict:
            k = index[id(row)]
            g = gen.generate(ids_of[k], max_new_tokens, row.get("indices") if "input_ids" in row else None)
            text_ids = g.output_ids[:-1] if g.output_ids[-1] in gen.eos_ids else g.output_ids
            if topo.rank == 0:
                print(f"[generate] line {k + 1}/{len(rows)}: {len(ids_of[k])} prompt tokens, prefill "
                      f"{g.prefill_s:.2f} s, {len(g.output_ids)} tokens in {g.decode_s:.2f} s", flush=True)
            out = {"output_ids": g.output_ids, "output_logprobs": g.logprobs, "text": tokenizer.decode(text_ids)}
            return out if "input_ids" in row else {"input_ids": ids_of[k], **out}

        results = map_rows(rows, run, topo, str(input_path))
        if topo.rank == 0:
            write_rows(output_path, rows, results)
        if dist.is_initialized():
            dist.barrier()
    return len(rows)
