"""Context parallelism over real gloo processes: each rank holds its share of q, k, v (zigzag
and the work-balanced split), runs document_attention with the CP group (K/V all-gather,
dK/dV reduce-scatter), and its outputs and input gradients must equal the float64 dense
oracle's shares."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attn_dense_ref import LAYOUTS, S, dense_attention

CASES = ["crossing_chunks", "one_token_docs", "one_doc", "batch_mixed", "random"]
TOL = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backends):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # CP = world over all ranks, then CP = 2 inside pairs of ranks (two groups at once)
        pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
        _check(dist.new_group(list(range(world))), backends)
        _check(pairs[rank // 2], backends)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check(group, backends):
    from megatron_prolong.attention import DocumentLayout, balanced_split, document_attention, zigzag_split

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if True:
        for ci, name in enumerate(CASES):
            rows = LAYOUTS[name]
            b = len(rows)
            layout = DocumentLayout.from_lengths(rows)
            g = torch.Generator().manual_seed(1000 + ci)  # same full tensors on every rank
            q = torch.randn(S, b, 4, 8, dtype=torch.float64, generator=g).requires_grad_()
            k = torch.randn(S, b, 2, 8, dtype=torch.float64, generator=g).requires_grad_()
            v = torch.randn(S, b, 2, 8, dtype=torch.float64, generator=g).requires_grad_()
            ref = dense_attention(q, k, v, rows)
            go = torch.randn(ref.shape, dtype=torch.float64, generator=g)
            gq, gk, gv = torch.autograd.grad(ref, (q, k, v), go)
            splits = {"zigzag": zigzag_split(layout, world),
                      "balanced": balanced_split(layout, world, min_chunk=2)}
            for backend, (kind, split) in ((b_, kv) for b_ in backends for kv in splits.items()):
                mine = lambda t: split.shard(t.transpose(0, 1), rank).transpose(0, 1)
                ql, kl, vl = (mine(t.detach()).requires_grad_() for t in (q, k, v))
                out = document_attention(ql, kl, vl, layout, cp_group=group, split=split,
                                         backend=backend)
                what_ = f"CP={world} {name}/{backend}/{kind} rank {rank}"
                err = (out - mine(ref)).abs().max().item()
                assert err < TOL, f"{what_}: output off by {err}"
                out.backward(mine(go))
                for t, full, what in ((ql, gq, "q"), (kl, gk, "k"), (vl, gv, "v")):
                    e = (t.grad - mine(full)).abs().max().item()
                    assert e < TOL, f"{what_}: d{what} off by {e}"


def test_cp_2_and_4_over_gloo_match_dense():
    mp.spawn(_worker, args=(4, _free_port(), ("reference", "sdpa")), nprocs=4, join=True)
