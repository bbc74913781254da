#!/usr/bin/env python
"""Forward+backward speed of document-masked attention on one GPU, side by side in one run.

Run from the repository root (needs only torch + triton, not megatron-core):

    PYTHONPATH=. PYTHONUNBUFFERED=1 python tools/bench_attention.py --out $OUT/bench.json

Shapes: 64K tokens, batch 1, 32 query heads, 8 KV heads, head dim 128, bf16 (Llama-3-8B).
Layouts: (a) one 64K document; (b) random document lengths of mean 8K; (c) mean 2K (lengths
drawn from an exponential distribution with that mean, at least 1 token, the last one cut to
fill the sequence; fixed seeds).

FLOP convention (FlashAttention's): useful forward FLOPs = 4 * d * hq * P, where P is the number
of unmasked (query, key) pairs, sum over documents of L (L + 1) / 2 (two matmuls, QK^T and PV,
2 FLOPs per multiply-add); the backward counts 2.5x the forward (five matmuls), so
forward+backward = 3.5 x forward. Time: median of triton.testing.do_bench over forward+backward
with a fixed random output gradient.

Sections:
- check: every GPU backend vs the ``reference`` backend (float32 math on the same bf16 inputs)
  on a small multi-document layout with one-token documents, at CP = 1, 2 (ranks emulated
  with the full K/V), output and dq/dk/dv relative errors.
- dense: dense causal SDPA on one 64K document (PyTorch's choice, cuDNN, FlashAttention-2).
- main: the plugin's backends on layouts a/b/c.
- fresh: the first and second call on layouts never seen before (plans, graphs, compilation).

Context parallelism (one rank's share against the gathered keys): tools/bench_cp.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
import traceback

import torch

sys.path.insert(0, os.getcwd())
from megatron_prolong.attention import (  # noqa: E402
    AttentionConfig,
    DocumentLayout,
    attend_gathered,
    pieces,
    resolve_backend,
    shard_zigzag,
    unshard_zigzag,
    zigzag_split,
)

CUDNN_FIRST = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def doc_lengths(seed: int, s: int, mean: float | None) -> list[int]:
    if mean is None:
        return [s]
    rng = random.Random(seed)
    out, left = [], s
    while left:
        n = min(left, max(1, int(rng.expovariate(1.0 / mean))))
        out.append(n)
        left -= n
    return out


def useful_pairs(layout: DocumentLayout, split=None, cp_rank=0) -> int:
    """Unmasked (query, key) pairs of one rank (of ``split``; default: CP = 1)."""
    tot = 0
    for _, lq0, lq1, k0, k1 in pieces(layout, split or zigzag_split(layout, 1), cp_rank):
        n, L = lq1 - lq0, k1 - k0
        tot += n * (L - n) + n * (n + 1) // 2
    return tot


# ---------------------------------------------------------------------- Transformer Engine
def te_available():
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception as e:  # noqa: BLE001
        print(f"Transformer Engine not importable: {type(e).__name__}: {e}"[:300], flush=True)
        return False


_TE_DPA = {}


def te_thd(layout: DocumentLayout):
    """fn(q, k, v) -> [s, b, hq*d]: TE's DotProductAttention, THD, padding_causal (cuDNN fused
    attention; TE picks it: FlashAttention is not installed), cumulative lengths of the layout."""
    import transformer_engine.pytorch as tep

    cu = layout.cu_seqlens_flat()
    m = layout.max_doc_len()

    def fn(q, k, v):
        s, b, hq, d = q.shape
        hkv = k.shape[2]
        key = (hq, hkv, d)
        if key not in _TE_DPA:
            _TE_DPA[key] = tep.DotProductAttention(
                hq, d, num_gqa_groups=hkv, attention_dropout=0.0, qkv_format="thd",
                attn_mask_type="padding_causal",
            )
        flat = lambda t: t.transpose(0, 1).reshape(b * s, t.shape[2], d)
        o = _TE_DPA[key](flat(q), flat(k), flat(v), cu_seqlens_q=cu, cu_seqlens_kv=cu,
                         max_seqlen_q=m, max_seqlen_kv=m)
        return o.view(b, s, hq * d).transpose(0, 1)
    return fn


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------- check
def check(args, report):
    s, hq, hkv, d = 4096, 8, 2, 128
    lengths = [1, 1, 700, 1, 333, 1200] + doc_lengths(5, s - 2236, 300)
    layout = DocumentLayout.from_lengths([lengths], device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(s, 1, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(s, 1, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(s, 1, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    go = torch.randn(s, 1, hq * d, device="cuda", dtype=torch.bfloat16, generator=g)

    def run(backend, cp, **kw):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        outs = [attend_gathered(shard_zigzag(qq, 0, cp, r), kk, vv, layout, cp_size=cp,
                                cp_rank=r, backend=backend) for r in range(cp)]
        out = unshard_zigzag(torch.cat(outs), 0, cp)
        out.backward(go)
        return out.detach(), qq.grad, kk.grad, vv.grad

    ref = run("reference", 1)
    cases = [("flex", {}), ("sdpa", {}), ("auto", {}), ("cudnn", {})]
    keep = set(filter(None, args.check_backends.split(",")))
    if keep:
        cases = [c for c in cases if c[0] in keep]
    if args.te:
        cases.append(("te_thd", {}))
    for cp in (1, 2):
        for backend, kw in cases:
            if backend == "te_thd" and cp > 1:
                continue
            name = backend + "".join(f"[{a}={b}]" for a, b in kw.items())
            try:
                if backend == "te_thd":
                    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
                    out = te_thd(layout)(qq, kk, vv)
                    out.backward(go)
                    got = (out.detach(), qq.grad, kk.grad, vv.grad)
                else:
                    got = run(backend, cp, **kw)
                errs = [rel(a, b) for a, b in zip(got, ref)]
                mad = [(a.float() - b.float()).abs().max().item() for a, b in zip(got, ref)]
                ok = max(errs) < 3e-2
                row = {"backend": name, "cp": cp, "out": errs[0], "dq": errs[1], "dk": errs[2],
                       "dv": errs[3], "max_abs": mad, "ok": ok}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = {"backend": name, "cp": cp, "error": f"{type(e).__name__}: {e}"[:300],
                       "ok": False}
            report["check"].append(row)
            print("check", json.dumps(row), flush=True)
    if "cudnn" in [c[0] for c in cases]:
        check_cudnn_odd(report)


def check_cudnn_odd(report):
    """backend cudnn on 2 rows of 1000 tokens (b > 1, token count not a multiple of 64,
    documents spanning a whole row, one-token documents), fresh inputs, vs the reference."""
    s, b, hq, hkv, d = 1000, 2, 8, 2, 128
    lengths = [[1, 999], [300, 1, 1, 500, 198]]
    layout = DocumentLayout.from_lengths(lengths, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(7)
    mk = lambda h: torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    go = torch.randn(s, b, hq * d, device="cuda", dtype=torch.bfloat16, generator=g)
    res = {}
    for backend in ("reference", "cudnn"):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        try:
            out = attend_gathered(qq, kk, vv, layout, backend=backend)
            out.backward(go)
            res[backend] = (out.detach(), qq.grad, kk.grad, vv.grad)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res[backend] = f"{type(e).__name__}: {e}"[:300]
    if isinstance(res["cudnn"], str):
        row = {"backend": "cudnn[b=2,s=1000]", "cp": 1, "error": res["cudnn"], "ok": False}
    else:
        errs = [rel(a, r) for a, r in zip(res["cudnn"], res["reference"])]
        mad = [(a.float() - r.float()).abs().max().item()
               for a, r in zip(res["cudnn"], res["reference"])]
        row = {"backend": "cudnn[b=2,s=1000]", "cp": 1, "out": errs[0], "dq": errs[1],
               "dk": errs[2], "dv": errs[3], "max_abs": mad, "ok": max(errs) < 3e-2}
    report["check"].append(row)
    print("check", json.dumps(row), flush=True)


# ---------------------------------------------------------------------- timing
def bench(step, grads):
    import triton.testing

    return triton.testing.do_bench(step, warmup=args_g.warmup, rep=args_g.rep,
                                   grad_to_none=grads, return_mode="median")


def time_case(report, section, name, layout_name, fn, q, k, v, go, pairs, hq, d, extra=None):
    if time.time() - T0 > args_g.budget_s:
        print(f"skip {name} {layout_name}: time budget", flush=True)
        return
    row = {"section": section, "name": name, "layout": layout_name}
    row.update(extra or {})
    try:
        t_c = time.time()
        out = fn(q, k, v)  # compile / warm
        out.backward(go)
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.time() - t_c, 1)

        def step():
            fn(q, k, v).backward(go)

        ms = bench(step, [q, k, v])
        fwd = 4.0 * d * hq * pairs
        row.update(ms=round(ms, 3), tflops=round(3.5 * fwd / (ms * 1e-3) / 1e12, 1))
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:400]
        traceback.print_exc()
    report["rows"].append(row)
    print("row", json.dumps(row), flush=True)
    if args_g.out:
        with open(args_g.out, "w") as f:
            json.dump(report, f, indent=1)


def make_inputs(s, b, hq, hkv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16,
                               generator=g).requires_grad_()
    return mk(hq), mk(hkv), mk(hkv)


def main():
    global args_g, T0
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--sections", default="check,dense,main")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rep", type=int, default=1500)
    p.add_argument("--budget-s", type=float, default=520)
    p.add_argument("--te", choices=("auto", "yes", "no"), default="auto",
                   help="time Transformer Engine's THD attention (auto: when importable)")
    p.add_argument("--cases", default="",
                   help="main section: only these case names (';'-separated; empty: all)")
    p.add_argument("--layouts", default="", help="main section: only these layouts")
    p.add_argument("--check-backends", default="", help="check section: only these backends")
    p.add_argument("--fresh", default="auto,flex,sdpa,cudnn",
                   help="fresh section: backends")
    p.add_argument("--out", default=None)
    args_g = p.parse_args()
    args_g.te = args_g.te == "yes" or (args_g.te == "auto" and te_available())
    T0 = time.time()
    for key in ("recompile_limit", "cache_size_limit"):
        try:
            setattr(torch._dynamo.config, key, 64)
        except Exception:  # noqa: BLE001
            pass
    sections = args_g.sections.split(",")
    props = torch.cuda.get_device_properties(0)
    report = {"device": props.name, "torch": torch.__version__, "argv": sys.argv, "check": [],
              "rows": [], "fresh": [],
              "attention_config": dataclasses.asdict(AttentionConfig())}
    if args_g.te:
        import transformer_engine

        report["transformer_engine"] = transformer_engine.__version__
        report["env"] = {k: v for k, v in os.environ.items() if k.startswith("NVTE_")}
    print(f"device {props.name}, torch {torch.__version__}, cuda {torch.version.cuda}", flush=True)

    if "check" in sections:
        check(args_g, report)

    s, b, hq, hkv, d = args_g.seq, 1, 32, 8, 128
    layouts = {
        "a_1doc": DocumentLayout.from_lengths([doc_lengths(0, s, None)], device="cuda"),
        "b_mean8K": DocumentLayout.from_lengths([doc_lengths(1, s, 8192)], device="cuda"),
        "c_mean2K": DocumentLayout.from_lengths([doc_lengths(2, s, 2048)], device="cuda"),
    }
    for n, lay in layouts.items():
        bd = lay.boundaries()[0]
        report.setdefault("layouts", {})[n] = {"docs": len(bd) - 1, "pairs": useful_pairs(lay)}
    q, k, v = make_inputs(s, b, hq, hkv, d)
    go = torch.randn(s, b, hq * d, device="cuda", dtype=torch.bfloat16)

    if "dense" in sections:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        pairs = useful_pairs(layouts["a_1doc"])

        def dense(backends, expand=False):
            def fn(q, k, v):
                qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
                if expand:
                    kk = kk.repeat_interleave(hq // hkv, dim=1)
                    vv = vv.repeat_interleave(hq // hkv, dim=1)
                ctx = sdpa_kernel(backends) if backends else contextlib.nullcontext()
                with ctx:
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True,
                                                       enable_gqa=not expand)
                return o.permute(2, 0, 1, 3).reshape(s, b, hq * d)
            return fn

        for name, be, ex in [("dense_sdpa_default", None, False),
                             ("dense_sdpa_cudnn", [SDPBackend.CUDNN_ATTENTION], False),
                             ("dense_sdpa_flash", [SDPBackend.FLASH_ATTENTION], False)]:
            time_case(report, "dense", name, "a_1doc", dense(be, ex), q, k, v, go, pairs, hq, d)

    if "main" in sections:
        for lname, lay in layouts.items():
            pairs = useful_pairs(lay)
            plugin = lambda backend, lay=lay: (lambda q, k, v: attend_gathered(
                q, k, v, lay, backend=backend))
            cases = []
            if args_g.te:
                cases.append(("TE_thd[cudnn]", "te", {}))
            cases.append(("auto", "auto", {}))
            cases += [("flex", "flex", {}), ("sdpa[per-doc]", "sdpa", {}), ("cudnn[thd]", "cudnn", {})]
            keep = set(filter(None, args_g.cases.split(";")))
            if keep:
                cases = [c for c in cases if c[0] in keep]
            if args_g.layouts and lname not in args_g.layouts.split(","):
                continue
            for name, backend, kw in cases:
                if backend == "te":
                    fn = te_thd(lay)
                else:
                    fn = plugin(backend)
                extra = {"resolved": resolve_backend("auto", q.device, lay, dtype=q.dtype,
                                                     head_dim=d)} if \
                    backend == "auto" else None
                time_case(report, "main", name, lname, fn, q, k, v, go, pairs, hq, d, extra)

    if "fresh" in sections:
        # first call (fwd+bwd) on a layout never seen before: what a new micro-batch costs once
        # (block mask, cuDNN graphs for new lengths, plans), to be spread over the layers
        for mean, seeds in ((8192, (101, 102)), (2048, (201, 202))):
            for seed in seeds:
                lay = DocumentLayout.from_lengths([doc_lengths(seed, s, mean)], device="cuda")
                pairs = useful_pairs(lay)
                for name in (["te"] if args_g.te else []) + args_g.fresh.split(","):
                    fn = te_thd(lay) if name == "te" else (
                        lambda q, k, v, name=name, lay=lay: attend_gathered(q, k, v, lay,
                                                                            backend=name))
                    try:
                        torch.cuda.synchronize()
                        t0 = time.time()
                        fn(q, k, v).backward(go)
                        torch.cuda.synchronize()
                        t1 = time.time()
                        fn(q, k, v).backward(go)
                        torch.cuda.synchronize()
                        t2 = time.time()
                        row = {"section": "fresh", "name": name, "layout": f"mean{mean}_s{seed}",
                               "first_ms": round((t1 - t0) * 1e3, 1),
                               "second_ms": round((t2 - t1) * 1e3, 1)}
                    except Exception as e:  # noqa: BLE001
                        row = {"section": "fresh", "name": name, "layout": f"mean{mean}_s{seed}",
                               "error": f"{type(e).__name__}: {e}"[:300]}
                    report["fresh"].append(row)
                    print("fresh", json.dumps(row), flush=True)

    # ------------------------------------------------------------ summary
    print("\n== checks (relative error vs reference; ok < 3e-2) ==")
    for c in report["check"]:
        if "error" in c:
            print(f"  {c['backend']:14s} cp={c['cp']}  ERROR {c['error'][:120]}")
        else:
            print(f"  {c['backend']:32s} cp={c['cp']}  out {c['out']:.1e} dq {c['dq']:.1e} "
                  f"dk {c['dk']:.1e} dv {c['dv']:.1e} max|diff| {max(c['max_abs']):.1e} "
                  f"{'ok' if c['ok'] else 'FAIL'}")
    for r in report["fresh"]:
        print(f"  fresh layout {r['layout']:14s} {r['name']:8s} " + (
            f"first call {r['first_ms']:8.1f} ms, second {r['second_ms']:7.1f} ms"
            if "error" not in r else f"ERROR {r['error'][:120]}"))
    print(f"\n== fwd+bwd TFLOP/s (3.5 x useful fwd FLOPs), {props.name} ==")
    print(f"layouts: {report.get('layouts')}")
    for r in report["rows"]:
        tag = f"{r['section']:9s} {r['name']:32s} {r['layout']:9s}" + (
            f" rank{r['rank']}" if "rank" in r else "")
        if "error" in r:
            print(f"  {tag} ERROR {r['error'][:150]}")
        else:
            extra = ""
            if "local_tokens" in r:
                extra = f"  {r['ms'] / r['local_tokens'] * 1e3:.3f} us/token"
            print(f"  {tag} {r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s"
                  f" (first call {r['first_call_s']} s){extra}")
    if "megatron_prolong.attention.backends.cudnn_thd" in sys.modules:
        from megatron_prolong.attention.backends import cudnn_thd

        report["cudnn_graphs"] = [str(k) for k in cudnn_thd._GRAPHS]
        try:
            import cudnn

            report["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
            report["cudnn_backend"] = cudnn.backend_version()
        except Exception:  # noqa: BLE001
            pass
        print(f"cudnn-frontend {report.get('cudnn_frontend')}, cuDNN {report.get('cudnn_backend')},"
              f" graphs built: {report['cudnn_graphs']}")
    stats = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats",)}
    report["dynamo"] = stats
    print(f"dynamo counters: {stats}; total {time.time() - T0:.0f} s")
    if args_g.out:
        with open(args_g.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
