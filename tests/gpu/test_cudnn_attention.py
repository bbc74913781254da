"""GPU: the ``cudnn`` kernel (the one ``auto`` uses for packed rows, and under CP) against the
``reference`` backend (float32 math on the same bf16 inputs): outputs and q/k/v gradients, at
CP = 1 and under CP (simulated on one GPU: every rank's queries against the full K/V, with the
zigzag and the balanced split: the square and rectangle calls of attention/ring.py), on rows
with one-token documents, a document crossing every chunk, b > 1 with a token total that is not
a multiple of 64, and short documents all placed whole (no rectangle on any rank).

bf16 rounds to 2^-8 = 3.9e-3 relative per value; the kernels agree with the reference to
2-3.5e-3 relative norm error (docs/benchmarks.md), so 1e-2 fails real bugs (a wrong mask or
offset gives errors of order 1) without failing on rounding.
"""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.attention import (
    DocumentLayout, attend_gathered, balanced_split, spread_split, zigzag_split,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROWS = {
    "tiny_docs": [[1, 1, 700, 1, 333, 1200, 1, 1859]],
    "one_doc": [[4096]],
    "b2_odd": [[1, 999, 300, 1, 1, 500, 198], [1000, 1000]],
    "short_whole": [[256] * 16],  # every document whole on a rank: no rectangle anywhere
}
TOL = 1e-2


def _run(backend, rows, cp, kind, q, k, v, go):
    layout = DocumentLayout.from_lengths(rows, device="cuda")
    split = {"zigzag": lambda: zigzag_split(layout, cp),
             "balanced": lambda: balanced_split(layout, cp),
             "spread": lambda: spread_split(layout, cp, min_chunk=64, work_fraction=1.0),
             "whole": lambda: spread_split(layout, cp, min_chunk=1 << 20, work_fraction=1.0)}[kind]()
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outs = [attend_gathered(split.shard(qq.transpose(0, 1), r).transpose(0, 1), kk, vv, layout,
                            split=split, cp_rank=r, backend=backend) for r in range(cp)]
    full = torch.cat(outs)
    nat = split.natural("cuda")
    out = torch.stack([full[nat[row], row] for row in range(full.shape[1])], dim=1)
    out.backward(go)
    return out.detach(), qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("name", sorted(ROWS))
@pytest.mark.parametrize("cp,kind", [(1, "zigzag"), (2, "zigzag"), (2, "balanced"), (4, "balanced"),
                                     (8, "balanced"), (2, "spread"), (4, "spread"), (8, "spread"),
                                     (4, "whole")])
def test_cudnn_matches_reference(name, cp, kind):
    from megatron_prolong.attention.backends import cudnn_thd

    assert cudnn_thd.available(), cudnn_thd.MISSING
    rows = ROWS[name]
    if kind == "whole" and name != "short_whole":
        pytest.skip("the whole-documents split is for rows of short documents")
    s, b, hq, hkv, d = sum(rows[0]), len(rows), 8, 2, 128
    g = torch.Generator(device="cuda").manual_seed(cp)
    mk = lambda h: torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    go = torch.randn(s, b, hq * d, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = _run("reference", rows, 1, "zigzag", q, k, v, go)
    got = _run("cudnn", rows, cp, kind, q, k, v, go)
    errs = [((a.float() - r.float()).norm() / r.float().norm()).item() for a, r in zip(got, ref)]
    print(f"cudnn {name} CP={cp} {kind}: out / dq / dk / dv relative error "
          + " / ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < TOL, errs
