"""Context-parallel attention timing.

Two modes:

- ``--simulate C[,C...]`` (one process, one GPU): each CP rank's compute timed alone, its
  queries (as the CP split assigns them) against the full K/V, forward+backward, as TFLOP/s of
  its unmasked causal pairs, next to the same kernel's rate at CP = 1 on the same row. The
  per-rank rate under CP over the CP = 1 rate is the efficiency of the kernel on a rank's pieces
  (target >= 90%); max/mean per-rank time is the imbalance a step waits for. Example:
  ``python tools/bench_cp.py --simulate 2,8 --seq 131072 --backends cudnn,flex --out r.json``.
  ``--stream N`` times instead a stream of N different random rows of the recipe's length mix
  (``MIXES``: stage 1 at 64K-ish rows, stage 2 at 512K), each a fresh layout as in training, so
  plans and cuDNN graph builds are counted: a cold pass (builds included) and a warm pass.
  ``--profile`` prints the kernel table of one step of the slowest rank of each row.
- otherwise (``torchrun --nproc_per_node N``): attention time per token at CP = N with the real
  K/V all-gather and dK/dV reduce-scatter (NCCL, or gloo on CPU at small sizes).

FLOP convention as tools/bench_attention.py: 4 x dim x heads x pairs forward, x 3.5 fwd+bwd.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.distributed as dist

from megatron_prolong.attention import (
    AttentionConfig, DocumentLayout, attend_gathered, balance, document_attention, pieces, split_for,
)

from bench_attention import doc_lengths, useful_pairs  # the same layouts as the one-GPU benchmark

LAYOUTS = {"one_doc": None, "mean8K": 8192, "mean2K": 2048, "docs64K": 65536, "mean1.5K": 1536}
#: the recipe's row mix per stage (ProLong, Gao et al. 2024, sec. 3 and table 9): stage 1 is 60%
#: single-document rows and 40% packed short documents (mean ~1.5K); stage 2 (512K) draws 20%
#: single 512K documents, 40% rows of 64K documents packed 8 per row, 40% short documents
MIXES = {"stage1": {"one_doc": 0.6, "mean1.5K": 0.4},
         "stage2": {"one_doc": 0.2, "docs64K": 0.4, "mean1.5K": 0.4}}


def _row(name: str, seed: int, seq: int) -> list[int]:
    if name == "docs64K":  # 64K documents, exactly, as stage 2 packs them
        return [65536] * (seq // 65536) + ([seq % 65536] if seq % 65536 else [])
    return doc_lengths(seed, seq, LAYOUTS[name])


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--mean-doc", type=float, default=0, help="torchrun mode: mean document length (0: one document)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--backend", default="auto", help="torchrun mode")
    p.add_argument("--split", default="balanced", choices=("balanced", "spread", "zigzag"))
    p.add_argument("--simulate", default="", help="CP sizes to simulate on one GPU, e.g. 2,8")
    p.add_argument("--backends", default="cudnn,flex", help="simulate mode: kernels to time")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="simulate mode")
    p.add_argument("--stream", type=int, default=0, help="simulate mode: rows of the mix instead")
    p.add_argument("--mix", default="stage1", choices=sorted(MIXES))
    p.add_argument("--profile", action="store_true", help="simulate mode: kernel table, slowest rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file (rank 0)")
    return p.parse_args(argv)


def _time(step, warmup: int, rep: int, cuda: bool) -> float:
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rep):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / rep


def simulate(args) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    full = lambda h: torch.randn(args.seq, 1, h, args.dim, generator=g, device=device, dtype=dtype)
    q, k, v = full(args.heads), full(args.kv_heads), full(args.kv_heads)
    flop = lambda pairs, sec: 3.5 * 4 * args.dim * args.heads * pairs / sec / 1e12
    rows = []
    for lname in args.layouts.split(","):
        layout = DocumentLayout.from_lengths([_row(lname, 0, args.seq)], device=device)
        for backend in args.backends.split(","):
            cfg = AttentionConfig(kernel=backend, cp_split=args.split)

            def step(cp, r, split):
                qq = split.shard(q.transpose(0, 1), r).transpose(0, 1).detach().requires_grad_()
                kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
                # autograd.grad, not backward: no accumulation into the whole K/V's .grad, which
                # a real rank (local K/V) does not have
                return lambda: torch.autograd.grad(attend_gathered(
                    qq, kk, vv, layout, split=split, cp_rank=r, config=cfg).float().square().mean(),
                    (qq, kk, vv))

            one = split_for(layout, 1)
            try:
                t1 = _time(step(1, 0, one), args.warmup, args.rep, cuda)
            except Exception as e:  # noqa: BLE001 - e.g. cudnn-frontend missing: say so, go on
                rows.append({"layout": lname, "backend": backend, "error": f"{type(e).__name__}: {e}"[:300]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            base = flop(useful_pairs(layout), t1)
            for cp in (int(c) for c in args.simulate.split(",")):
                split = split_for(layout, cp, args.split)
                times, rates = [], []
                for r in range(cp):
                    t = _time(step(cp, r, split), args.warmup, args.rep, cuda)
                    times.append(t)
                    rates.append(flop(useful_pairs(layout, split, r), t))
                if args.profile and cuda:
                    _profile(step(cp, int(torch.tensor(times).argmax()), split), f"{lname} CP={cp}")
                rows.append({
                    "layout": lname, "backend": backend, "cp": cp, "split": args.split,
                    "work_balance": round(balance(layout, split), 4),
                    "time_max_over_mean": round(max(times) * cp / sum(times), 4),
                    "cp1_tflops": round(base, 1), "rank_tflops": [round(x, 1) for x in rates],
                    "min_rank_rate_vs_cp1": round(min(rates) / base, 3),
                    "ms_per_rank": [round(1e3 * t, 2) for t in times],
                    # of the slowest rank's pairs, the share in its causal squares: the work that
                    # needs no remote K/V, behind which the all-gather runs (ring.py)
                    "square_share_slowest": round(_square_share(layout, split, int(
                        torch.tensor(times).argmax())), 4),
                })
                print(json.dumps(rows[-1]), flush=True)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "seq": args.seq,
            "heads": [args.heads, args.kv_heads, args.dim], "rows": rows}


def _square_share(layout, split, rank: int) -> float:
    ps = pieces(layout, split, rank)
    square = sum((p.q1 - p.q0) * (p.q1 - p.q0 + 1) // 2 for p in ps)
    return square / max(1, useful_pairs(layout, split, rank))


def _profile(step, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"== profile, slowest rank: {title}\n"
          + prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60),
          flush=True)


def stream(args) -> dict:
    """Each CP rank (and CP = 1) over the same stream of fresh random rows: cold and warm pass."""
    from megatron_prolong.attention.backends import cudnn_thd

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rng = random.Random(1)
    mix = MIXES[args.mix]
    names = rng.choices(list(mix), weights=list(mix.values()), k=args.stream)
    lengths = [_row(n, 100 + i, args.seq) for i, n in enumerate(names)]
    g = torch.Generator(device=device).manual_seed(0)
    full = lambda h: torch.randn(args.seq, 1, h, args.dim, generator=g, device=device, dtype=dtype)
    q, k, v = full(args.heads), full(args.kv_heads), full(args.kv_heads)
    flop = lambda pairs, sec: 3.5 * 4 * args.dim * args.heads * pairs / sec / 1e12
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "seq": args.seq,
           "mix": args.mix, "rows": names, "backend": args.backends.split(",")[0], "results": []}
    cfg = AttentionConfig(kernel=out["backend"], cp_split=args.split)
    for cp in [1] + [int(c) for c in args.simulate.split(",")]:
        per_rank = []
        for r in range(cp):
            passes = []
            for _ in range(2):  # cold (plans and graphs built as they come), then warm
                builds0 = len(cudnn_thd._GRAPHS)
                pairs, seconds = 0, 0.0
                for row in lengths:
                    layout = DocumentLayout.from_lengths([row], device=device)  # fresh, as training
                    split = split_for(layout, cp, args.split)
                    qq = split.shard(q.transpose(0, 1), r).transpose(0, 1).detach().requires_grad_()
                    kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    attend_gathered(qq, kk, vv, layout, split=split, cp_rank=r,
                                    config=cfg).float().square().mean().backward()
                    if cuda:
                        torch.cuda.synchronize()
                    seconds += time.perf_counter() - t0
                    pairs += useful_pairs(layout, split, r)
                passes.append({"seconds": seconds, "tflops": flop(pairs, seconds),
                               "graphs_built": len(cudnn_thd._GRAPHS) - builds0})
            per_rank.append(passes)
        cold = [p[0]["tflops"] for p in per_rank]
        warm = [p[1]["tflops"] for p in per_rank]
        res = {"cp": cp, "cold_tflops": [round(x, 1) for x in cold],
               "warm_tflops": [round(x, 1) for x in warm],
               "graphs_built_cold": [p[0]["graphs_built"] for p in per_rank],
               "graphs_built_warm": [p[1]["graphs_built"] for p in per_rank],
               "warm_time_max_over_mean": round(max(p[1]["seconds"] for p in per_rank) * cp
                                                / sum(p[1]["seconds"] for p in per_rank), 4),
               "_cold": cold, "_warm": warm}
        if cp > 1:
            base = out["results"][0]
            res["min_rank_rate_vs_cp1_warm"] = round(min(warm) / base["_warm"][0], 3)
            res["min_rank_rate_vs_cp1_cold"] = round(min(cold) / base["_cold"][0], 3)
        out["results"].append(res)
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}), flush=True)
    for res in out["results"]:
        del res["_cold"], res["_warm"]
    out["graph_cache"] = len(cudnn_thd._GRAPHS)
    return out


def distributed(args) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    layout = DocumentLayout.from_lengths([doc_lengths(0, args.seq, args.mean_doc or None)], device=device)
    split = split_for(layout, cp, args.split)
    g = torch.Generator(device=device).manual_seed(0)  # the same full row on every rank

    def mine(h: int) -> torch.Tensor:
        x = torch.randn(args.seq, 1, h, args.dim, generator=g, device=device, dtype=dtype)
        return split.shard(x.transpose(0, 1), rank).transpose(0, 1).contiguous().requires_grad_()

    q, k, v = mine(args.heads), mine(args.kv_heads), mine(args.kv_heads)
    group = dist.group.WORLD if cp > 1 else None

    def step() -> None:
        out = document_attention(q, k, v, layout, cp_group=group, split=split, backend=args.backend)
        out.float().square().mean().backward()

    dist.barrier()
    seconds = _time(step, args.warmup, args.rep, cuda)
    times = [None] * cp
    dist.all_gather_object(times, seconds)
    result = {
        "cp": cp, "seq": args.seq, "mean_doc": args.mean_doc, "backend": args.backend,
        "split": args.split, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "ms_per_rank": [1e3 * t for t in times],
        "us_per_local_token": [1e6 * t / (args.seq // cp) for t in times],
    }
    dist.destroy_process_group()
    return result if rank == 0 else {}


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    if args.simulate:
        result = stream(args) if args.stream else simulate(args)
    else:
        result = distributed(args)
    if result:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
