"""Rotary position embedding of q and k, fused with Triton (``kernels.rope``).

Megatron's unfused RoPE (``_apply_rotary_pos_emb_bshd``) makes cos and sin copies in the
activations' dtype and then five elementwise passes (two products, the rotate-half negation and
concatenation, the sum) over q and again over k, each rounding to bf16; the backward repeats that.
Here one kernel pass reads each head once (through any strides: q and k may be views of the fused
QKV projection's output), computes cos and sin from the fp32 angles and writes the rotated head
once; the backward is the same kernel with the angle negated. Half-split (non-interleaved) layout,
as Llama's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_prolong.model.cross_entropy import triton_available

if TYPE_CHECKING:
    from megatron_prolong.model.builder import ProLongTransformerConfig

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(x_ptr, out_ptr, ang_ptr, batch, heads, sx_s, sx_b, sx_h, sa_s, sa_b, sign,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        s_idx = token // batch
        b_idx = token % batch
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        ang = tl.load(ang_ptr + s_idx * sa_s + b_idx * sa_b + d)
        cos = tl.cos(ang)[None, :]
        sin = (tl.sin(ang) * sign)[None, :]
        mask = (h < heads)[:, None]
        src = x_ptr + s_idx * sx_s + b_idx * sx_b + h[:, None] * sx_h + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = out_ptr + token * heads * 2 * HALF + h[:, None] * 2 * HALF + d[None, :]
        tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


class RopeAngles:
    """The rotary angles [s_local, b, 1, dim] (fp32) of the latest micro-batch, shared by every
    core-attention layer of one model (``model.builder.block_spec`` hands the same object to each).

    The RoPE settings are this object's own, so only the positions decide a rebuild: the angles are
    computed once per micro-batch, not once per layer, and the previous micro-batch's are dropped
    here as soon as the next one arrives (a layer's autograd graph may still hold them until its
    backward). The positions tensor is compared by identity and held, so its id cannot be reused.
    """

    def __init__(self, config: ProLongTransformerConfig) -> None:
        self.interpolation_factor = config.rope_interpolation_factor
        self.inv_freq = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=config.rope_base,
            rope_scaling=config.rope_scaling == "llama3",
            rope_scaling_factor=config.rope_scaling_factor,
            use_cpu_initialization=True,
        ).inv_freq
        self._positions: torch.Tensor | None = None
        self._angles: torch.Tensor | None = None

    def __call__(self, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Angles of ``positions`` [s_local, b] on ``device``, repeated for both halves of each head."""
        if positions is not self._positions or self._angles.device != device:
            self._angles = None  # free the previous micro-batch's before building this one's
            self._positions, self._angles = positions, self._build(positions, device)
        return self._angles

    def _build(self, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)  # once: a copy from the host would sync every build
        pos = positions.to(device=device, dtype=torch.float32)
        if self.interpolation_factor is not None:
            pos = pos / self.interpolation_factor
        freqs = pos[..., None] * self.inv_freq
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]


def _rotate(x: torch.Tensor, angles: torch.Tensor, sign: float) -> torch.Tensor:
    s, b, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((s, b, heads, dim), dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(heads), 16)
    grid = (s * b, triton.cdiv(heads, block_h))
    _rope_kernel[grid](x, out, angles, b, heads, x.stride(0), x.stride(1), x.stride(2),
                       angles.stride(0), angles.stride(1), sign, HALF=dim // 2, BLOCK_H=block_h)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, angles):
        ctx.save_for_backward(angles)
        return _rotate(x, angles, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (angles,) = ctx.saved_tensors
        return _rotate(grad, angles, -1.0), None


def apply_rope(query: torch.Tensor, key: torch.Tensor, emb: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [s, b, hq, d] and k [s, b, hk, d] by ``emb`` [s, b, 1, d] (the angles, repeated
    for both halves, fp32). ``impl``: triton (CUDA) or torch (Megatron's unfused function)."""
    if impl == "torch":
        return _apply_rotary_pos_emb_bshd(query, emb), _apply_rotary_pos_emb_bshd(key, emb)
    angles = emb[..., 0, : emb.shape[-1] // 2].float()
    if angles.stride(-1) != 1:
        angles = angles.contiguous()
    return _Rope.apply(query, angles), _Rope.apply(key, angles)


def resolve_rope(choice: str) -> str:
    """``auto``: the Triton kernel on CUDA, Megatron's unfused RoPE elsewhere."""
    if choice == "auto":
        return "triton" if torch.cuda.is_available() and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("kernels.rope=triton needs the `triton` package; use kernels.rope=torch")
    return choice
