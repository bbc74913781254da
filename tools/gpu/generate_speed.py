#!/usr/bin/env python
"""Greedy decoding speed on one GPU against the memory bound, and against Hugging Face's generate.

Llama-3-8B shape (hidden 4096, 32 heads, 8 KV groups, FFN 14336, vocab 128256), random weights,
bf16, plugin attention. For each layer count and prompt length:

- the HBM bandwidth of this GPU, measured in this run (a large device-to-device copy);
- the bytes a decode step must read (every weight matrix, the output layer, one embedding row,
  and the prompt's K/V in every layer) and so the memory-bound time per token;
- our time per token with the decode step replayed from a CUDA graph and launched eagerly, the
  first sample of a length (graph capture included) and the next one (the graph replayed);
- one recall sample (prefill + ``--new-tokens`` tokens), ours and, for the first layer count,
  Hugging Face transformers' greedy ``generate`` (sdpa, bf16, its default dynamic cache) on the
  Hugging Face export of the same weights (the project's exporter);
- a batch of ``--batch`` prompts of the shortest length: decode tokens/s against batch 1.

Also checks, at 4K, that the graphed and the eager decode give the same tokens and that the cached
decode's log-probabilities match the full forward. Writes $OUT/generate_speed.json.

    python tools/gpu/generate_speed.py [--layers 16,32] [--lengths 32768,131072] [--new-tokens 100]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

VOCAB = 128256


def hbm_bandwidth(gib: int = 4, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    x = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * reps / (time.perf_counter() - start)


def step_bytes(gpt, prompt: int) -> int:
    """What one decode step of one row reads: all weights but the embedding (one row of it), and the K/V
    of ``prompt`` tokens in every layer."""
    cfg = gpt.config
    elem = next(gpt.parameters()).element_size()
    weights = sum(p.numel() for n, p in gpt.named_parameters() if "word_embeddings" not in n) * elem
    cache = len(gpt.decoder.layers) * 2 * cfg.num_query_groups * cfg.kv_channels * prompt * elem
    return weights + cfg.hidden_size * elem + cache


def build(layers: int):
    from megatron_prolong.config import KernelConfig, ModelConfig, ParallelConfig, TrainConfig
    from megatron_prolong.model.builder import build_model, build_transformer_config

    model = ModelConfig(name="llama3_8b_shape", num_layers=layers, hidden_size=4096, ffn_hidden_size=14336,
                        num_attention_heads=32, num_query_groups=8, rope_base=8e6, attention_backend="plugin")
    # the kernels inference.load_model builds with (the trainer's defaults: Triton RoPE, fused SwiGLU)
    tconfig = build_transformer_config(model, ParallelConfig(), TrainConfig(precision="bf16"), KernelConfig())
    return model, build_model(model, tconfig, VOCAB, 131072 + 1024, seed=0).cuda().eval()


def export_hf(gpt, model, folder: Path):
    """The project's exporter on this model's tensors, then transformers' own loader."""
    from transformers import LlamaForCausalLM

    from megatron_prolong.convert.hf import hf_config_for
    from megatron_prolong.convert.mapping import expand, fmt
    from megatron_prolong.convert.safetensors_io import write_hf

    params = dict(gpt.named_parameters())

    def tensors():
        for e, i in expand(model):
            name = fmt(e.param, i)
            t = params[name].detach()
            yield name, (t[:VOCAB] if e.vocab else t).cpu()

    write_hf(folder, tensors(), model, VOCAB, torch.bfloat16, 5 << 30, "exporting")
    (folder / "config.json").write_text(json.dumps(hf_config_for(model, VOCAB, 131072 + 1024, torch.bfloat16)))
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()


def hf_sample(hf, prompt: list[int], new: int, cache: str = "dynamic") -> dict:
    """Seconds for the prefill alone (one new token) and for prefill + ``new`` tokens. ``cache="static"``:
    transformers' static cache, which it compiles on first use: one untimed sample first, then the
    timed one (a prefill alone would need another cache shape, so it is not timed)."""
    ids = torch.tensor([prompt], device="cuda")
    mask = torch.ones_like(ids)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    times = {}
    for n in ((new, new) if cache == "static" else (1, new)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, **extra)
        torch.cuda.synchronize()
        times.setdefault("first", time.perf_counter() - start)
        times[n] = time.perf_counter() - start
    return {"prefill_s": times.get(1), "first_sample_s": times["first"], "sample_s": times[new],
            "tokens": out[0, len(prompt):].tolist()}


def ours_sample(gen, prompt: list[int], new: int) -> dict:
    res = gen.generate(prompt, new)
    return {"prefill_s": res.prefill_s, "decode_s": res.decode_s, "sample_s": res.prefill_s + res.decode_s,
            "per_token_s": res.decode_s / (len(res.output_ids) - 1), "tokens": res.output_ids}


def profile(graphed, eager, prompt: list[int], path: Path) -> None:
    """CUDA kernel time by kernel over 20 decode steps of each path (the step after a 2-token warm-up)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    lines = []
    for name, gen in (("graphed", graphed), ("eager", eager)):
        gen.generate(prompt, 2)
        _, _, step = gen._decoder
        step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                step()
            torch.cuda.synchronize()
        lines.append(f"== {name}: 20 steps\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                                            max_name_column_width=70))
    path.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def profile_prefill(gen, prompt: list[int], path: Path) -> None:
    """CUDA kernel time by kernel of one prefill (the prompt and its first token), after one unprofiled."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    gen.generate(prompt, 1)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        gen.generate(prompt, 1)
        torch.cuda.synchronize()
    table = f"== prefill of {len(prompt)} tokens\n" + prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    path.write_text(table)
    print(table, flush=True)


def check_4k(gpt, gen_graphed, gen_eager, g) -> dict:
    from megatron_prolong.eval.score import score_line

    prompt = torch.randint(0, 128000, (4096,), generator=g).tolist()
    a, b = gen_graphed.generate(prompt, 32), gen_eager.generate(prompt, 32)
    full = score_line(gpt, prompt + a.output_ids, None, VOCAB, "continuous")[len(prompt):]
    return {"graphed_equals_eager": a.output_ids == b.output_ids,
            "max_abs_logprob_graphed_vs_eager": max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)),
            "max_abs_logprob_cached_vs_full": max(abs(x - y) for x, y in zip(full, a.logprobs))}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default="16,32", help="layer counts; the HF comparison runs at the first")
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--new-tokens", type=int, default=100, help="HELMET's recall tasks generate up to 100")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--hf-cache", default="dynamic", choices=("dynamic", "static"),
                   help="transformers' KV cache for its generate (static: compiled on first use)")
    p.add_argument("--profile", action="store_true",
                   help="kernel tables of 20 decode steps (eager and graphed) and of one prefill at the last length")
    args = p.parse_args()
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.eval.generate import Generator
    from megatron_prolong.inference import megatron_session

    lengths = [int(x) for x in args.lengths.split(",")]
    new = args.new_tokens
    bw = hbm_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "dtype": "bf16", "new_tokens": new,
           "hbm_bytes_per_s": bw, "runs": []}
    print(f"{out['device']}: device copy {bw / 1e12:.2f} TB/s", flush=True)
    dest = Path(os.environ.get("OUT", "/tmp/out"))
    dest.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    ours_tokens: dict[tuple[int, int], list[int]] = {}
    prompts = {n: [torch.randint(0, 128000, (n,), generator=g).tolist() for _ in range(args.batch + 1)]
               for n in lengths}
    with megatron_session(ParallelConfig()):
        for k, layers in enumerate(int(x) for x in args.layers.split(",")):
            start = time.perf_counter()
            model, gpt = build(layers)
            print(f"{layers} layers built in {time.perf_counter() - start:.0f} s", flush=True)
            graphed = Generator(gpt, VOCAB, "continuous", [], 131072 + 1024)
            eager = Generator(gpt, VOCAB, "continuous", [], 131072 + 1024, graphs="off")
            if k == 0:
                out["check_4k"] = check_4k(gpt, graphed, eager, g)
                print(json.dumps(out["check_4k"]), flush=True)
            for n in lengths:
                bound = step_bytes(gpt, n) / bw
                first = ours_sample(graphed, prompts[n][0], new)
                second = ours_sample(graphed, prompts[n][1], new)
                slow = ours_sample(eager, prompts[n][1], 16)
                run = {"layers": layers, "prompt_tokens": n, "bytes_per_token": step_bytes(gpt, n),
                       "memory_bound_s": bound, "graphed": {k2: v for k2, v in second.items() if k2 != "tokens"},
                       "graphed_first_sample_s": first["sample_s"], "eager_per_token_s": slow["per_token_s"],
                       "per_token_over_bound": second["per_token_s"] / bound,
                       "eager_equals_graphed": slow["tokens"] == second["tokens"][:16]}
                print(json.dumps(run), flush=True)
                out["runs"].append(run)
                ours_tokens[layers, n] = second["tokens"]
                torch.cuda.empty_cache()
            if args.profile:
                profile(graphed, eager, prompts[lengths[0]][1], dest / f"profile_{layers}l.txt")
                profile_prefill(graphed, prompts[lengths[-1]][1], dest / f"prefill_profile_{layers}l.txt")
            n = lengths[0]
            one = graphed.generate_batch(prompts[n][1:2], new)[0]
            many = graphed.generate_batch(prompts[n][1:args.batch + 1], new)
            out.setdefault("batch", []).append({
                "layers": layers, "prompt_tokens": n, "batch": args.batch,
                "decode_tokens_per_s_batch1": (new - 1) / one.decode_s,
                "decode_tokens_per_s_batch": args.batch * (new - 1) / many[0].decode_s,
                "sample_s_per_row_in_batch": (sum(g.prefill_s for g in many) + many[0].decode_s) / args.batch,
                "graph_captured": graphed._decoder[2].graph is not None,
                "rows_equal_batch1": many[0].output_ids == one.output_ids})
            print(json.dumps(out["batch"][-1]), flush=True)
            del graphed, eager
            gc.collect()
            torch.cuda.empty_cache()
            if k == 0 and not args.no_hf:
                with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                    start = time.perf_counter()
                    hf = export_hf(gpt, model, Path(tmp))
                    print(f"HF export + load in {time.perf_counter() - start:.0f} s", flush=True)
                    del gpt
                    gc.collect()
                    torch.cuda.empty_cache()
                    for n in lengths:
                        h = hf_sample(hf, prompts[n][1], new, args.hf_cache)
                        mine = next(r for r in out["runs"] if r["layers"] == layers and r["prompt_tokens"] == n)
                        cmp = {"layers": layers, "prompt_tokens": n, "hf_cache": args.hf_cache,
                               "hf_prefill_s": h["prefill_s"], "hf_first_sample_s": h["first_sample_s"],
                               "hf_sample_s": h["sample_s"], "ours_sample_s": mine["graphed"]["sample_s"],
                               "ours_over_hf": mine["graphed"]["sample_s"] / h["sample_s"],
                               "leading_tokens_equal": next((i for i, (a, b) in enumerate(
                                   zip(h["tokens"], ours_tokens[layers, n])) if a != b), new)}
                        out.setdefault("hf", []).append(cmp)
                        print(json.dumps(cmp), flush=True)
                        torch.cuda.empty_cache()
                    del hf
            else:
                del gpt
            gc.collect()
            torch.cuda.empty_cache()
            (dest / "generate_speed.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
