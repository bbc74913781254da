"""GPU: the Triton passes of attention/ring_ops.py equal their PyTorch forms (which the CPU
tests use): the log-sum-exp merge, the row add and the gather-sum, on random rows, with heads
that are not a power of two and strided outputs."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.attention.ring_ops import add_rows_, gather_sum, merge_

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _both(fn, *tensors):
    """fn on CUDA tensors (Triton) and on CPU copies (PyTorch); returns both results."""
    gpu = [t.clone() for t in tensors]
    cpu = [t.cpu().clone() for t in tensors]
    fn(*gpu)
    fn(*cpu)
    return gpu, cpu


@pytest.mark.parametrize("heads,d", [(32, 128), (6, 64)])
def test_merge_matches_torch(heads, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    T = 1000
    o = torch.randn(T, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    o_r = torch.randn_like(o)
    lse = torch.randn(T, heads, device="cuda", generator=g) * 5
    lse_r = torch.randn_like(lse) * 5
    rows = torch.randperm(T, device="cuda", generator=g)[:300].sort().values
    gpu, cpu = _both(lambda a, b, c, e, r: merge_(a, b, c, e, r), o, lse, o_r, lse_r, rows)
    assert torch.allclose(gpu[0].float().cpu(), cpu[0].float(), atol=1e-2, rtol=1e-2)
    assert torch.allclose(gpu[1].cpu(), cpu[1], atol=1e-5)
    untouched = torch.ones(T, dtype=torch.bool)
    untouched[rows.cpu()] = False
    assert torch.equal(gpu[0].cpu()[untouched], o.cpu()[untouched])


def test_add_rows_and_gather_sum_match_torch():
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(500, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.randn_like(x)
    rows = torch.arange(10, 400, 3, device="cuda")
    gpu, cpu = _both(add_rows_, x, y, rows)
    assert torch.allclose(gpu[0].float().cpu(), cpu[0].float(), atol=1e-2)
    src = torch.randn(700, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    table = torch.randint(-1, 700, (600, 3), device="cuda", generator=g, dtype=torch.int32)
    out = torch.empty(600, 16, 128, device="cuda", dtype=torch.bfloat16)  # write into half of it
    gather_sum(out[:, 8:], src, table)
    # the reference sums in float32 and rounds once, as the kernel does (a bf16 sum of up to 3
    # terms rounds after each addition: up to one bf16 step apart at |x| ~ 4)
    ref = torch.empty(600, 8, 128, dtype=torch.float32)
    gather_sum(ref, src.float().cpu(), table.cpu())
    torch.testing.assert_close(out[:, 8:].float().cpu(), ref, rtol=4e-3, atol=1e-6)
