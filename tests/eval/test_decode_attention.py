"""The split-key decode attention (eval/decode_attention.py) against a float64 softmax: Triton's
kernels in its CPU interpreter (TRITON_INTERPRET=1, set in a child process before Triton loads) and
the PyTorch form the CPU decode uses, in float32 (Triton 3.6's interpreter multiplies bf16 blocks
wrongly, so the bf16 kernel is checked on the GPU: tests/gpu/test_decode_graphs.py), with grouped
query heads, masked slots, a cache length that is not a multiple of the key block, and a row that
sees no key at all (a CP shard without its document: output 0, log-sum-exp -inf); and a row's
output does not change, to the bit, when the cache grows by empty slots (a batch's longer prompt)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_prolong.eval.decode_attention import torch_attend

REPO = Path(__file__).resolve().parents[2]


def case(dtype: torch.dtype, cap: int = 600):
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d = 3, 8, 2, 64
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, cap, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, cap, d, generator=g).to(dtype)
    valid = torch.rand(b, cap, generator=g) < 0.7
    valid[1, 300:] = False  # a row whose last blocks are all masked
    valid[2] = False  # a row that sees nothing
    return q, k, v, valid, d ** -0.5


def reference(q, k, v, valid, scale):
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.double().reshape(b, hkv, hq // hkv, d)
    s = torch.matmul(qg, k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return torch.matmul(p, v.double()).reshape(b, hq, d), lse.reshape(b, hq)


def check(attend, dtype: torch.dtype, tol: float, cap: int = 600) -> None:
    q, k, v, valid, scale = case(dtype, cap)
    out, lse = (x.cpu() for x in attend(q, k, v, valid, scale))
    ref_out, ref_lse = reference(q, k, v, valid, scale)
    assert out.dtype == lse.dtype == torch.float32
    seen = valid.any(dim=1)
    torch.testing.assert_close(out[seen].double(), ref_out[seen], atol=tol, rtol=tol)
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], atol=tol, rtol=tol)
    assert torch.all(out[~seen] == 0) and torch.all(lse[~seen] == float("-inf"))


def same_at_larger_capacity(attend, dtype: torch.dtype, cap: int = 600, more: int = 424) -> None:
    """The cache of ``cap`` slots and the same cache with ``more`` slots of other keys, masked, after it."""
    q, k, v, valid, scale = case(dtype, cap)
    g = torch.Generator().manual_seed(1)
    wide = [torch.cat([t, torch.randn(*t.shape[:2], more, t.shape[3], generator=g).to(dtype)], dim=2) for t in (k, v)]
    wide_valid = torch.cat([valid, torch.zeros(valid.shape[0], more, dtype=torch.bool)], dim=1)
    out, lse = attend(q, k, v, valid, scale)
    out2, lse2 = attend(q, *wide, wide_valid, scale)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_torch_form_equals_float64():
    check(torch_attend, torch.float32, 1e-5)


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_decode_attention import check, same_at_larger_capacity
from megatron_prolong.eval.decode_attention import triton_attend
check(triton_attend, torch.float32, 1e-5)
check(lambda *a: triton_attend(*a, block_n=32), torch.float32, 1e-5)
same_at_larger_capacity(triton_attend, torch.float32)
print("ok")
"""


def test_triton_kernels_equal_float64_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(Path(__file__).parent))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
