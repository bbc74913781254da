"""One greedy decode step for every row of a batch, on fixed buffers, run eagerly or replayed from a
CUDA graph.

A decode step of an 8B model is a few hundred small kernels; launched one by one from Python they
take ~40 ms a token, ten times the time the GPU needs to read the weights and the cache. The step
here reads its inputs (last tokens, RoPE positions, the cache's write slot) from device buffers and
writes its outputs (next tokens, their log-probabilities) into device buffers, and moves its own
inputs on by one token at the end, so the whole step is captured once into a CUDA graph and
replayed for every later token and every later batch of the same shape. The prefill stays
outside the graph (its shapes change with every prompt).

Graphs need one process per model replica (TP = CP = 1): the merge of CP partials and the TP
vocabulary argmax are collectives, run eagerly there.
"""

from __future__ import annotations

import logging

import torch

from megatron_prolong.eval.kv_cache import CachedPackedSeqParams, KVCache
from megatron_prolong.eval.model import (
    forward_hidden, output_logits, vocab_parallel_argmax, vocab_parallel_logprobs,
)

logger = logging.getLogger(__name__)


class DecodeStep:
    """Greedy decoding of ``cache.batch`` rows against ``cache``; ``graphed``: replay a CUDA graph."""

    def __init__(self, gpt, cache: KVCache, vocab_size: int, tp_group, graphed: bool) -> None:
        device = cache.valid.device
        b = cache.batch
        self.gpt, self.cache, self.vocab_size, self.tp_group = gpt, cache, vocab_size, tp_group
        self.graphed = graphed
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=device)  # GPTModel's input_ids [b, s]
        self.positions = torch.zeros(1, b, dtype=torch.long, device=device)  # RoPE positions [s, b]
        self.result = torch.zeros(2, b, dtype=torch.float64, device=device)  # tokens, log p: one read per step
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, tokens: list[int], positions: list[int]) -> None:
        """Each row's last token and the RoPE position of the token to come."""
        self.ids.copy_(torch.tensor(tokens, dtype=torch.long)[:, None])
        self.positions.copy_(torch.tensor(positions, dtype=torch.long)[None, :])

    def _run(self) -> None:
        self.cache.begin_step()
        # A new view each call: the model's RoPE angles are cached per positions object, and the
        # captured step must compute them from the buffer rather than reuse the last call's.
        packed = CachedPackedSeqParams(qkv_format="sbhd", layout=None, positions=self.positions.view(1, -1),
                                       kv_cache=self.cache)
        hidden = forward_hidden(self.gpt, self.ids, packed)  # [1, b, h]
        logits = output_logits(self.gpt, hidden)[0]  # [b, V / tp]
        token = vocab_parallel_argmax(logits, self.vocab_size, self.tp_group)
        self.result[0].copy_(token)
        self.result[1].copy_(vocab_parallel_logprobs(logits, token, self.vocab_size, self.tp_group))
        self.ids.copy_(token[:, None])
        self.positions.add_(1)
        self.cache.end_step()

    def _capture(self) -> None:
        """Run this step eagerly on a side stream (it also loads Triton kernels and cuBLAS handles,
        which must not happen during capture), then record the step; recording runs nothing."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._run()
        except RuntimeError as err:  # a kernel that cannot be captured: eager from now on, said once
            logger.warning("generate: decode step launched without CUDA graphs: capture failed (%s)", err)
            self.graphed = False
            return
        self.graph = graph

    @torch.no_grad()
    def __call__(self) -> tuple[list[int], list[float]]:
        """One token for every row: (tokens, log-probabilities)."""
        if not self.graphed:
            self._run()
        elif self.graph is None:
            self._capture()
        else:
            self.graph.replay()
        tokens, logprobs = self.result.tolist()
        return [int(t) for t in tokens], logprobs
