"""Context parallelism over real gloo processes: each rank holds its share of q, k, v (zigzag
and the work-balanced split), runs document_attention with the CP group (K/V all-gather,
dK/dV reduce-scatter), and its outputs and input gradients must equal the float64 dense
oracle's shares."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainrun import free_port

from attn_dense_ref import LAYOUTS, S, dense_attention

CASES = ["crossing_chunks", "one_token_docs", "one_doc", "batch_mixed", "random"]
TOL = 1e-10


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
    from megatron_prolong.attention import (
        DocumentLayout, balanced_split, document_attention, spread_split, zigzag_split,
    )

    world, rank = dist.get_world_size(group), dist.get_rank(group)
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
        splits = {"zigzag": zigzag_split(layout, world), "balanced": balanced_split(layout, world),
                  "spread": spread_split(layout, world, min_chunk=2)}
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
    mp.spawn(_worker, args=(4, free_port(), ("reference", "sdpa")), nprocs=4, join=True)


def _worker_agreement(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from megatron_prolong.attention import DocumentLayout, balanced_split, document_attention
        from megatron_prolong.attention.backends import cudnn_thd
        from megatron_prolong.attention.dispatch import agree_kernel

        group = dist.group.WORLD
        # one rank cannot build cuDNN's graphs: the whole group runs flex, the others switch cuDNN off
        failed = "graphs failed to build" if rank == 1 else None
        assert agree_kernel("cudnn", failed, group, torch.device("cpu")) == "flex"
        assert cudnn_thd.DISABLED is not None
        cudnn_thd.DISABLED = None
        # a rank without cudnn-frontend resolves to flex itself: the others follow it
        assert agree_kernel("flex" if rank == 2 else "cudnn", None, group, torch.device("cpu")) == "flex"
        assert agree_kernel("cudnn", None, group, torch.device("cpu")) == "cudnn"
        # short documents, each placed whole on one rank: no rank has a rectangle, so no K/V
        # all-gather and no reduce-scatter run (they would raise here), and the result is exact
        rows = [[16] * 16]
        layout = DocumentLayout.from_lengths(rows)
        split = balanced_split(layout, world)
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(256, 1, h, 8, dtype=torch.float64, generator=g).requires_grad_()
                   for h in (4, 2, 2))
        ref = dense_attention(q, k, v, rows)
        go = torch.randn(ref.shape, dtype=torch.float64, generator=g)
        grads = torch.autograd.grad(ref, (q, k, v), go)
        mine = lambda t: split.shard(t.transpose(0, 1), rank).transpose(0, 1)
        ql, kl, vl = (mine(t.detach()).requires_grad_() for t in (q, k, v))

        def refuse(*a, **kw):
            raise AssertionError("no collective expected for whole documents")

        dist.all_gather, saved = refuse, dist.all_gather
        dist.barrier()
        try:
            out = document_attention(ql, kl, vl, layout, cp_group=group, split=split,
                                     backend="reference")
            out.backward(mine(go))
        finally:
            dist.all_gather = saved
        assert (out - mine(ref)).abs().max().item() < TOL
        for t, full in zip((ql, kl, vl), grads):
            assert (t.grad - mine(full)).abs().max().item() < TOL
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_cp_group_agrees_on_the_kernel_and_skips_collectives_without_rectangles():
    mp.spawn(_worker_agreement, args=(4, free_port()), nprocs=4, join=True)
