"""The output layer's vocabulary-parallel cross entropy in blocks of tokens, fused with Triton.

Forward, per block of tokens: logits = x W^T (in the weights' dtype, this TP rank's slice of the
vocabulary); one kernel pass over each row gives its maximum, its sum of exponentials and the
target's logit; the TP ranks combine those ([tokens] floats: three all-reduces per micro-batch).
The logits are dropped, only the log-sum-exp is kept. Backward, per block: the logits are
recomputed, one kernel pass turns them in place into (softmax - one-hot) x dloss, and two matmuls
give dx and accumulate dW. dW is summed over the blocks in fp32 and cast to the weights' dtype
once: a bf16 buffer would round after each of the 32 blocks of a 64K sequence.

Against the unfused path (Megatron's ``vocab_parallel_cross_entropy`` under activation
checkpointing, :mod:`megatron_prolong.model.loss`): the same math on the same bf16 logits, but no
fp32 copies (2 instead of 14 bytes per logit alive), the cross entropy's forward runs once instead
of twice, and about ten elementwise passes over each block become two.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_forward_kernel(logits_ptr, stride, labels_ptr, vocab_start, n_cols, max_ptr, sum_ptr, target_ptr,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
        here = (label >= 0) & (label < n_cols)
        target = tl.load(base + tl.where(here, label, 0)).to(tl.float32)
        tl.store(max_ptr + row, m)
        tl.store(sum_ptr + row, s)
        tl.store(target_ptr + row, tl.where(here, target, 0.0))

    @triton.jit
    def _ce_backward_kernel(logits_ptr, stride, labels_ptr, vocab_start, n_cols, lse_ptr, dloss_ptr,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        lse = tl.load(lse_ptr + row)
        g = tl.load(dloss_ptr + row).to(tl.float32)
        label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(base + cols, (p * g).to(logits_ptr.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return min(4096, triton.next_power_of_2(n_cols))


def _accumulate_weight_grad(dw: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor) -> None:
    """dw (fp32) += dlogits^T x, the products summed in fp32 and never rounded to bf16 on the way.
    CUDA: cuBLAS adds the bf16 GEMM's fp32 result straight into dw (``out_dtype``). CPU has no
    such kernel: the operands are widened to fp32 first (exact), which sums in the same precision."""
    if dw.is_cuda:
        torch.addmm(dw, dlogits.t(), x, out_dtype=torch.float32, out=dw)
    else:
        dw.addmm_(dlogits.t().float(), x.float())


def _tp_size(group) -> int:
    return group.size() if group is not None and dist.is_initialized() else 1


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Per-token loss of ``x @ weight.T`` against ``labels``; ``weight`` is this TP rank's
    vocabulary slice starting at ``vocab_start``. x: [n, h], labels: [n]; returns fp32 [n]."""

    @staticmethod
    def forward(ctx, x, weight, labels, block_size: int, tp_group, vocab_start: int):
        n, v = x.shape[0], weight.shape[0]
        row_max = torch.empty(n, dtype=torch.float32, device=x.device)
        row_sum = torch.empty_like(row_max)
        target = torch.empty_like(row_max)
        for i in range(0, n, block_size):
            logits = F.linear(x[i : i + block_size], weight)
            _ce_forward_kernel[(logits.shape[0],)](
                logits, logits.stride(0), labels[i : i + block_size], vocab_start, v,
                row_max[i:], row_sum[i:], target[i:], BLOCK=_block(v), num_warps=16)
        if _tp_size(tp_group) > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            row_sum *= torch.exp(row_max - global_max)
            dist.all_reduce(row_sum, group=tp_group)
            dist.all_reduce(target, group=tp_group)
            row_max = global_max
        lse = row_max + torch.log(row_sum)
        ctx.save_for_backward(x, weight, labels, lse)
        ctx.block_size, ctx.vocab_start = block_size, vocab_start
        return lse - target

    @staticmethod
    def backward(ctx, dloss):
        x, weight, labels, lse = ctx.saved_tensors
        dloss = dloss.contiguous()
        n, v = x.shape[0], weight.shape[0]
        dx = torch.empty_like(x)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for i in range(0, n, ctx.block_size):
            xb = x[i : i + ctx.block_size]
            logits = F.linear(xb, weight)
            _ce_backward_kernel[(logits.shape[0],)](
                logits, logits.stride(0), labels[i : i + ctx.block_size], ctx.vocab_start, v,
                lse[i:], dloss[i:], BLOCK=_block(v), num_warps=16)
            torch.mm(logits, weight, out=dx[i : i + ctx.block_size])
            if dw is not None:
                _accumulate_weight_grad(dw, logits, xb)
        return dx, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, block_size: int,
                               tp_group=None) -> torch.Tensor:
    """fp32 per-token loss [n] of the vocabulary-parallel output layer over x [n, h]."""
    rank = tp_group.rank() if _tp_size(tp_group) > 1 else 0
    return FusedLinearCrossEntropy.apply(x.contiguous(), weight, labels.contiguous(), block_size, tp_group,
                                         rank * weight.shape[0])
