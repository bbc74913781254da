"""GPU: the decode step replayed from a CUDA graph gives the tokens and log-probabilities of the same
step launched eagerly, and a batch of prompts gives each prompt's output alone, bitwise (fp32 and
bf16; rows are padded to the batch width, so the GEMMs are the same); in fp32 also equal to a
one-row decode; and the cached decode gives the log-probabilities of the full forward over
prompt + output. A 4-layer GQA model with random weights, prompts of mixed lengths, one packed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 32000
NEW = 40


@pytest.fixture(scope="module")
def session():
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.inference import megatron_session

    with megatron_session(ParallelConfig()):
        yield


def _model(precision: str):
    from megatron_prolong.config import KernelConfig, ModelConfig, ParallelConfig, TrainConfig
    from megatron_prolong.model.builder import build_model, build_transformer_config

    model = ModelConfig(name="decode_test", num_layers=4, hidden_size=1024, ffn_hidden_size=2816,
                        num_attention_heads=8, num_query_groups=2, rope_base=5e5, attention_backend="plugin")
    # the kernels inference.load_model uses: Triton RoPE and Megatron's compiled SwiGLU, under capture too
    tconfig = build_transformer_config(model, ParallelConfig(), TrainConfig(precision=precision), KernelConfig())
    return build_model(model, tconfig, VOCAB, 8192, seed=0).cuda().eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1500, 700, 1999, 1024)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_split_key_attention_equals_float64(dtype, tol):
    """The Triton kernels on the GPU, bf16 included (the CPU test runs them in float32 only), and the
    same bits for a row when the cache grows by empty slots."""
    import test_decode_attention as t

    from megatron_prolong.eval.decode_attention import triton_attend

    def attend(q, k, v, valid, scale):
        return triton_attend(q.cuda(), k.cuda(), v.cuda(), valid.cuda(), scale)

    t.check(attend, dtype, tol)
    t.check(attend, dtype, tol, cap=5000)  # 79 splits: the merge's chunks of 32 more than once
    t.same_at_larger_capacity(attend, dtype, more=1000)  # 10 splits against 25: a row alone = beside a longer one


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_equals_eager_and_batch_equals_single(session, precision):
    from megatron_prolong.eval.generate import Generator
    from megatron_prolong.eval.score import score_line

    gpt = _model(precision)
    prompts = _prompts()
    packing = [None, None, None, [[0, 500], [500, 1024]]]
    eager = Generator(gpt, VOCAB, "continuous", [], 8192, graphs="off", batch_size=4)
    graphed = Generator(gpt, VOCAB, "continuous", [], 8192, batch_size=4)
    assert graphed.graphed and not eager.graphed
    # each prompt alone (padded to the 4 rows), eagerly
    singles = [eager.generate(p, NEW, idx) for p, idx in zip(prompts, packing)]
    # twice through the graphed path: the second batch replays the graph captured by the first;
    # same kernels, same row count: bitwise the same tokens and log-probabilities, bf16 included
    for _ in range(2):
        batch = graphed.generate_batch(prompts, NEW, packing)
        for one, many in zip(singles, batch):
            assert many.output_ids == one.output_ids and many.logprobs == one.logprobs
            assert many.stats["batch"] == 4 and many.stats["rows"] == 4
    assert graphed._decoder[2].graph is not None  # captured, not fallen back to eager
    alone = [graphed.generate(p, NEW, idx) for p, idx in zip(prompts, packing)]
    assert [g.output_ids for g in alone] == [g.output_ids for g in singles]
    assert [g.logprobs for g in alone] == [g.logprobs for g in singles]
    if precision == "fp32":  # one row instead of four: another GEMM kernel, equal to fp32 rounding
        one_row = Generator(gpt, VOCAB, "continuous", [], 8192, batch_size=1)
        for p, idx, ref in zip(prompts, packing, singles):
            g = one_row.generate(p, NEW, idx)
            assert g.output_ids == ref.output_ids and g.stats["rows"] == 1
            assert max(abs(a - b) for a, b in zip(g.logprobs, ref.logprobs)) < 1e-4
    # the cached decode against the full forward over prompt + output (first prompt, one document)
    full = score_line(gpt, prompts[0] + singles[0].output_ids, None, VOCAB, "continuous")[len(prompts[0]):]
    bound = 1e-3 if precision == "fp32" else 0.15
    assert max(abs(a - b) for a, b in zip(full, singles[0].logprobs)) < bound
