"""Context-parallel attention timing: attention time per token at CP = N, communication included.

Each rank holds its zigzag share of a ``seq`` token row (32 query / 8 KV heads, dim 128 by
default) and runs the plugin's ``document_attention`` with the CP process group: the K/V
all-gather, the attention and, in backward, the reduce-scatter of the K/V gradients. Compare
``torchrun --nproc_per_node 2 tools/bench_cp.py --seq 131072`` with
``torchrun --nproc_per_node 1 tools/bench_cp.py --seq 65536`` (the issue's CP=2 at 128K vs CP=1 at 64K).
Runs on CPU over gloo too (small sizes; used by the tests to check the script, not for timing).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from megatron_prolong.attention.context_parallel import shard_zigzag
from megatron_prolong.attention.core import document_attention
from megatron_prolong.attention.layout import DocumentLayout

from bench_attention import doc_lengths  # the same random layouts as the single-GPU benchmark


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--mean-doc", type=float, default=0, help="mean document length (0: one document)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--backend", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file written by rank 0")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    layout = DocumentLayout.from_lengths([doc_lengths(0, args.seq, args.mean_doc or None)], device=device)
    g = torch.Generator(device=device).manual_seed(0)  # the same full row on every rank

    def full(h: int) -> torch.Tensor:
        return torch.randn(args.seq, 1, h, args.dim, generator=g, device=device, dtype=dtype)

    q, k, v = (shard_zigzag(full(h), 0, cp, rank).requires_grad_() for h in (args.heads, args.kv_heads, args.kv_heads))
    group = dist.group.WORLD if cp > 1 else None

    def step() -> None:
        out = document_attention(q, k, v, layout, cp_group=group, backend=args.backend)
        out.float().square().mean().backward()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.rep):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.rep
    times = [None] * cp
    dist.all_gather_object(times, seconds)
    result = {
        "cp": cp, "seq": args.seq, "mean_doc": args.mean_doc, "backend": args.backend,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "ms_per_rank": [1e3 * t for t in times],
        "us_per_local_token": [1e6 * t / (args.seq // cp) for t in times],
    }
    if rank == 0:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
