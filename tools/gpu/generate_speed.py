#!/usr/bin/env python
"""Greedy generation speed on one GPU: prefill tokens/s at 32K and 128K and decode tokens/s against
the 128K cache, Llama-3-8B shape (hidden 4096, 32 heads, 8 KV groups, FFN 14336, vocab 128256),
random weights, bf16, plugin attention; plus the cached decode checked against the full forward at
4K (log-probabilities of the generated tokens). Writes $OUT/generate_speed.json.

    python tools/gpu/generate_speed.py [--layers 32] [--lengths 32768,131072] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32, help="Llama-3-8B has 32 (fits an H200 with a 128K cache)")
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_prolong.inference import megatron_session
    from megatron_prolong.eval.generate import Generator
    from megatron_prolong.eval.score import score_line
    from megatron_prolong.model.builder import build_model, build_transformer_config

    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max(lengths) + args.new_tokens
    model = ModelConfig(name="llama3_8b_shape", num_layers=args.layers, hidden_size=4096, ffn_hidden_size=14336,
                        num_attention_heads=32, num_query_groups=8, rope_base=8e6, attention_backend="plugin")
    out = {"device": torch.cuda.get_device_name(), "layers": args.layers, "dtype": "bf16", "runs": []}
    with megatron_session(ParallelConfig()):
        start = time.perf_counter()
        tconfig = build_transformer_config(model, ParallelConfig(), TrainConfig(precision="bf16"))
        gpt = build_model(model, tconfig, 128256, longest, seed=0).cuda().eval()
        print(f"model built in {time.perf_counter() - start:.1f} s, "
              f"{sum(x.numel() for x in gpt.parameters()) / 1e9:.2f} B parameters", flush=True)
        gen = Generator(gpt, 128256, "continuous", [], longest)
        g = torch.Generator().manual_seed(0)
        # Correctness at 4K: the cached decode's log-probabilities against the full forward.
        prompt = torch.randint(0, 128000, (4096,), generator=g).tolist()
        res = gen.generate(prompt, 16)
        full = score_line(gpt, prompt + res.output_ids, None, 128256, "continuous")[len(prompt):]
        out["check_4k"] = {"max_abs_logprob_diff": max(abs(a - b) for a, b in zip(full, res.logprobs))}
        print(f"4K check: max |log p cached - log p full| = {out['check_4k']['max_abs_logprob_diff']:.4f}",
              flush=True)
        for n in lengths:
            prompt = torch.randint(0, 128000, (n,), generator=g).tolist()
            gen.generate(prompt[:1024], 4)  # warm-up of this shape family
            torch.cuda.reset_peak_memory_stats()
            res = gen.generate(prompt, args.new_tokens)
            decoded = len(res.output_ids) - 1
            run = {"prompt_tokens": n, "prefill_s": res.prefill_s, "prefill_tokens_per_s": n / res.prefill_s,
                   "decode_tokens": decoded, "decode_s": res.decode_s,
                   "decode_tokens_per_s": decoded / res.decode_s,
                   "cache_gib": res.stats["cache_bytes_per_rank"] / 2**30,
                   "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
            out["runs"].append(run)
            print(json.dumps(run), flush=True)
    dest = Path(os.environ.get("OUT", "/tmp/out"))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "generate_speed.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
