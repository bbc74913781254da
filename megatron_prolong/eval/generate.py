"""Greedy generation with a KV cache on the Megatron model, in any TP/CP layout, a batch of prompts
at a time.

Each prompt is prefilled on its own through the training forward (document-masked attention,
RoPE positions from the layout, the zigzag CP split); every layer's core attention stores its K/V
shard into the prompt's row of the cache (:mod:`megatron_prolong.eval.kv_cache`). Then one token
per row at a time goes through the same model against the cache, all rows together, until every
row has produced an EOS id or ``max_new_tokens``; a row's tokens after its EOS are dropped, so
each row's output is what it would be alone. Every rank of a model replica computes the same
tokens (TP argmax over the vocabulary shards, CP merge by log-sum-exp), so no broadcast is needed.
The decode step is replayed from a CUDA graph where it can be (:mod:`megatron_prolong.eval.decode_step`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prolong import inference
from megatron_prolong.eval.decode_step import DecodeStep
from megatron_prolong.eval.kv_cache import CachedPackedSeqParams, KVCache, capacity_for
from megatron_prolong.eval.model import (
    forward_hidden, output_logits, packed_line, padded_length, vocab_parallel_argmax, vocab_parallel_logprobs,
)
from megatron_prolong.eval.rows import EvalInputError

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    output_ids: list[int]
    logprobs: list[float]  # log p of each generated token (greedy: the maximum)
    prefill_s: float = 0.0  # this prompt's prefill
    decode_s: float = 0.0  # the decoding of its whole batch
    stats: dict = field(default_factory=dict)


class Generator:
    """Greedy decoding for one loaded GPTModel (``inference.load_model``) on this rank.

    ``batch_size``: prompts decoded together (fewer where their caches would not fit the GPU's free
    memory); a smaller batch is padded with idle rows to that width, so a prompt's output does not
    depend on its companions. ``graphs``: ``auto`` replays the decode step from a CUDA graph on a
    GPU at TP = CP = 1, ``off`` launches it eagerly.
    """

    def __init__(self, gpt, vocab_size: int, rope_mode: str, eos_ids: Sequence[int], max_length: int, *,
                 batch_size: int = 1, graphs: str = "auto") -> None:
        from megatron.core import parallel_state

        if batch_size < 1:
            raise EvalInputError(f"batch size {batch_size} must be at least 1")
        if graphs not in ("auto", "off"):
            raise EvalInputError(f"graphs={graphs!r}: use auto or off")
        self.gpt = gpt
        self.vocab_size = vocab_size
        self.rope_mode = rope_mode
        self.eos_ids = set(int(i) for i in eos_ids)
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = next(gpt.parameters()).device
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_size = parallel_state.get_context_parallel_world_size()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.graphed = graphs == "auto" and self.device.type == "cuda" and tp == 1 and self.cp_size == 1
        if graphs == "auto" and self.device.type == "cuda" and not self.graphed:
            logger.warning("generate: decode steps launched without CUDA graphs at tp=%d cp=%d (graphs need "
                           "tp = cp = 1: the TP argmax and the CP merge are collectives)", tp, self.cp_size)
        self._decoder: tuple[tuple[int, int], KVCache, DecodeStep] | None = None
        self._rows: dict[int, int] = {}  # rows_that_fit, per length bucket

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.max_length:
            raise EvalInputError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's length "
                f"{self.max_length} (the checkpoint's seq_length); shorten the input, lower --max-new-tokens, "
                "or pass --max-length to evaluate beyond the trained length on purpose")

    def _local_len(self, n: int) -> int:
        return padded_length(n, self.cp_size) // self.cp_size

    def bucket(self, prompt_len: int, max_new_tokens: int) -> int:
        """The cache slots per row a prompt needs: prompts of one bucket share a cache and a decode graph."""
        return capacity_for(self._local_len(prompt_len), max_new_tokens, self.cp_size)

    def rows_that_fit(self, prompt_len: int, max_new_tokens: int) -> int:
        """``batch_size``, or fewer where the rows' caches and one prefill would not fit free GPU memory.

        Decided once per length bucket (one collective, one warning), so every batch of a bucket has
        the same width, whoever asks (the batching of the rows, then ``generate_batch``)."""
        if self.device.type != "cuda" or self.batch_size == 1:
            return self.batch_size
        bucket = self.bucket(prompt_len, max_new_tokens)
        if bucket not in self._rows:
            self._rows[bucket] = self._measure_rows(prompt_len, bucket)
        return self._rows[bucket]

    def _measure_rows(self, prompt_len: int, slots: int) -> int:
        cfg = self.gpt.config
        tp = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        elem = next(self.gpt.parameters()).element_size()
        per_row = len(self.gpt.decoder.layers) * 2 * (cfg.num_query_groups // tp) * cfg.kv_channels * slots * elem
        # One prompt's prefill: the MLP's [s, 2 x ffn] and [s, ffn] outputs and a dozen [s, hidden] tensors.
        prefill = self._local_len(prompt_len) * (3 * cfg.ffn_hidden_size // tp + 12 * cfg.hidden_size) * elem
        held = self._decoder[1].memory_bytes() if self._decoder is not None else 0
        free = torch.cuda.mem_get_info(self.device)[0] + held - prefill
        rows = torch.tensor([max(1, min(self.batch_size, int(0.9 * free) // per_row))], device=self.device)
        for group in (self.tp_group, self.cp_group):  # ranks of one replica must run the same batches
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=group)
        rows = int(rows)
        if rows < self.batch_size:
            logger.warning("generate: %d rows of %d tokens fit the free GPU memory, not batch size %d",
                           rows, prompt_len, self.batch_size)
        return rows

    def _decoder_for(self, batch: int, capacity: int) -> tuple[KVCache, DecodeStep]:
        """The cache and decode step of this shape, kept from the last batch when it had the same one."""
        key = (batch, capacity)
        if self._decoder is None or self._decoder[0] != key:
            self._decoder = None  # free the previous cache (and graph) before making this one
            cache = KVCache(batch, capacity, self.device, self.cp_group if self.cp_size > 1 else None)
            self._decoder = (key, cache, DecodeStep(self.gpt, cache, self.vocab_size, self.tp_group, self.graphed))
        return self._decoder[1], self._decoder[2]

    def _prefill(self, cache: KVCache, row: int, tokens: Sequence[int], indices) -> tuple[int, float, int]:
        """One prompt into ``row`` of the cache: (first generated token, its log p, the next RoPE position)."""
        line = packed_line(tokens, indices, self.vocab_size, self.rope_mode, self.device)
        n = line.length
        doc = line.packed.layout.doc_ids[0]
        cache.begin_row(row, doc[line.index] == doc[n - 1])  # the last document, no padding
        packed = CachedPackedSeqParams(qkv_format="sbhd", layout=line.packed.layout,
                                       positions=line.packed.positions, kv_cache=cache)
        hidden = forward_hidden(self.gpt, line.ids, packed)  # [s_local, 1, h]
        here = (line.index == n - 1).nonzero().flatten()
        last = hidden[here[0]:here[0] + 1] if here.numel() else torch.zeros_like(hidden[:1])
        position = line.packed.positions[here[0], 0] + 1 if here.numel() else torch.zeros((), dtype=torch.long,
                                                                                          device=self.device)
        if self.cp_size > 1:  # only the rank holding the last prompt token has its hidden state
            dist.all_reduce(last, group=self.cp_group)
            position = position.reshape(1).clone()
            dist.all_reduce(position, group=self.cp_group)
        logits = output_logits(self.gpt, last)[:, 0]  # [1, V / tp]
        token = vocab_parallel_argmax(logits, self.vocab_size, self.tp_group)
        lp = vocab_parallel_logprobs(logits, token, self.vocab_size, self.tp_group)
        return int(token[0]), float(lp[0]), int(position.reshape(-1)[0])

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       indices: Sequence | None = None) -> list[Generation]:
        """Greedy continuations of the last document of each prompt (``indices``: optional packing per prompt)."""
        if not prompts or any(not p for p in prompts):
            raise EvalInputError("empty prompt: generation needs at least one token")
        for p in prompts:
            self.check_length(len(p), max_new_tokens)
        indices = list(indices) if indices is not None else [None] * len(prompts)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        local = [self._local_len(len(p)) for p in prompts]
        # Always the same number of rows (idle ones padded): cuBLAS picks its GEMM kernel by the row
        # count, so a prompt's bf16 output then does not depend on how many prompts share its batch.
        width = max(len(prompts), self.rows_that_fit(max(len(p) for p in prompts), max_new_tokens))
        cache, step = self._decoder_for(width, capacity_for(max(local), max_new_tokens, self.cp_size))
        outs, lps, nexts, prefill_s = [], [], [], []
        for row, (tokens, idx) in enumerate(zip(prompts, indices)):
            start = time.perf_counter()
            token, lp, position = self._prefill(cache, row, tokens, idx)
            sync()
            prefill_s.append(time.perf_counter() - start)
            outs.append([token])
            lps.append([lp])
            nexts.append(position)
        for row in range(len(prompts), width):
            cache.begin_row(row, torch.zeros(0, dtype=torch.bool))  # idle: sees no key, output discarded
        start = time.perf_counter()
        cache.start_decoding(local + [0] * (width - len(prompts)))
        idle = width - len(prompts)
        step.load([o[0] for o in outs] + [0] * idle, nexts + [0] * idle)
        active = [o[-1] not in self.eos_ids for o in outs]
        for _ in range(max_new_tokens - 1):
            if not any(active):
                break
            tokens, logprobs = step()
            for row, (token, lp) in enumerate(zip(tokens[:len(prompts)], logprobs)):
                if active[row]:
                    outs[row].append(token)
                    lps[row].append(lp)
                    active[row] = token not in self.eos_ids
        sync()
        decode_s = time.perf_counter() - start
        stats = {"batch": len(prompts), "rows": width, "cache_bytes_per_rank": cache.memory_bytes(),
                 "graphed": self.graphed}
        return [Generation(o, lp, ps, decode_s, {"prompt_tokens": len(p), **stats})
                for o, lp, ps, p in zip(outs, lps, prefill_s, prompts)]

    def generate(self, tokens: Sequence[int], max_new_tokens: int, indices=None) -> Generation:
        """Greedy continuation of the last document of ``tokens`` (``indices``: optional packing)."""
        return self.generate_batch([tokens], max_new_tokens, [indices])[0]


def generate_file(checkpoint: str | Path, input_path: str | Path, output_path: str | Path, *,
                  max_new_tokens: int, tp: int = 1, cp: int = 1, dtype: str | None = None,
                  max_length: int | None = None, eos: Sequence[int] | None = None, batch_size: int = 1,
                  graphs: str = "auto") -> int:
    """Greedy outputs for every line (``input_ids`` or ``prompt``); rank 0 writes ``output_path``.
    Lines of one length bucket are decoded ``batch_size`` at a time."""
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.eval.model import eos_ids, load_tokenizer
    from megatron_prolong.eval.rows import map_batches, read_lines, write_rows
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
                        max_length or int(meta["seq_length"]), batch_size=batch_size, graphs=graphs)
        ids_of = {k: prompt_ids(row) for k, row in enumerate(rows)}
        for k, ids in ids_of.items():  # refuse before any generation starts
            try:
                gen.check_length(len(ids), max_new_tokens)
            except EvalInputError as err:
                raise EvalInputError(f"{input_path}: line {k + 1}: {err}") from err
        index = {id(row): k for k, row in enumerate(rows)}

        def run(batch: list[dict]) -> list[dict]:
            ks = [index[id(row)] for row in batch]
            gens = gen.generate_batch([ids_of[k] for k in ks], max_new_tokens,
                                      [row.get("indices") if "input_ids" in row else None for row in batch])
            outs = []
            for k, row, g in zip(ks, batch, gens):
                text_ids = g.output_ids[:-1] if g.output_ids[-1] in gen.eos_ids else g.output_ids
                if topo.rank == 0:
                    print(f"[generate] line {k + 1}/{len(rows)}: {len(ids_of[k])} prompt tokens, prefill "
                          f"{g.prefill_s:.2f} s, {len(g.output_ids)} tokens in {g.decode_s:.2f} s "
                          f"(batch of {len(batch)})", flush=True)
                out = {"output_ids": g.output_ids, "output_logprobs": g.logprobs, "text": tokenizer.decode(text_ids)}
                outs.append(out if "input_ids" in row else {"input_ids": ids_of[k], **out})
            return outs

        def length(row: dict) -> int:
            return len(ids_of[index[id(row)]])

        results = map_batches(rows, run, topo, str(input_path),
                              batch_of=lambda row: gen.rows_that_fit(length(row), max_new_tokens),
                              order=lambda row: gen.bucket(length(row), max_new_tokens))
        if topo.rank == 0:
            write_rows(output_path, rows, results)
        if dist.is_initialized():
            dist.barrier()
    return len(rows)
