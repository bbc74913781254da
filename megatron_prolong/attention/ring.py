"""Context-parallel attention as two kernel calls per rank, merged by log-sum-exp.

A rank's piece (its queries ``[g, g + n)`` of one document starting at ``d0``, see
:func:`~.split.pieces`) sees the keys ``[d0, g + n)``: the causal *square* on its own tokens
``[g, g + n)`` plus, when ``g > d0``, the unmasked *rectangle* against the earlier keys
``[d0, g)``. The ring-attention identity makes the whole from the two partial results (each
normalised, with its log-sum-exp): ``o = o_sq w_sq + o_rect w_rect`` with weights
``exp(lse_part - lse)``, ``lse = logaddexp(lse_sq, lse_rect)``; the backward of each part, given
the *merged* ``o`` and ``lse``, yields that part's exact share of dQ/dK/dV.

Why: a piece as one call needs cuDNN's bottom-right causal mask, which runs at 58% of the
top-left causal rate on the same square (H200, docs/benchmarks.md); the squares are exactly the
CP = 1 problem (top-left causal, no gathered K/V: short documents that lie wholly on one rank
never touch remote keys), and the rectangles are dense.

Communication: the square needs only local K/V, so it runs while the K/V all-gather is in
flight (async collective); in the backward the rectangles' dK/dV are summed into the gathered
stream and reduce-scattered while the squares' backward runs. Layouts where no rank has a
rectangle (every document whole on one rank) skip both collectives; every rank knows this from
the layout alone, so they agree without talking.

Kernels implement ``partial_forward(part, q, k, v, scale) -> (o, lse)`` and
``partial_backward(part, q, k, v, o, lse, do, scale) -> (dq, dk, dv)`` on flat ``[T, h, d]``
tensors (``lse`` ``[T, hq]``, float32 or the inputs' float64), for a :class:`Part`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist

from .layout import DocumentLayout
from .ring_ops import add_rows_, gather_sum, merge_
from .split import CPSplit, pieces


@dataclass(frozen=True, eq=False)
class Part:
    """Sequences of one kernel call: query/key lengths, where each one's queries start (spans,
    back to back over the local stream) and whether the mask is causal (else none)."""

    q_lengths: tuple[int, ...]
    k_lengths: tuple[int, ...]
    q_spans: tuple[int, ...]
    causal: bool
    _cache: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class RingPlan:
    square: Part
    rect: Part | None  # None: this rank has no rectangle
    any_rect: bool  # some rank of the group has one (the collectives run)
    rows: torch.Tensor  # int64: flat local query rows that have a rectangle
    rect_natural: torch.Tensor  # int64: the rectangles' keys, flat natural positions (row * s + p)
    rect_gathered: torch.Tensor  # the same keys in the all-gathered stream (rank-major, flat)
    local_natural: torch.Tensor  # int64: this rank's tokens, flat natural positions
    size: int  # tokens of the whole batch (b * s): the gathered stream's length

    @cached_property
    def table_gathered(self) -> torch.Tensor:
        """For :func:`gather_sum`: gathered position -> its sources in the rectangles' stream."""
        return _table(self.rect_gathered, self.size)

    @cached_property
    def table_natural(self) -> torch.Tensor:
        """Natural position -> sources in the rectangles' stream followed by the local tokens."""
        return _table(torch.cat([self.rect_natural, self.local_natural]), self.size)


def _table(dest: torch.Tensor, size: int) -> torch.Tensor:
    """int32 ``[size, M]``: for each destination the source indices into ``dest``'s order that
    land there (-1: none); M is the largest multiplicity (1 if there is none)."""
    order = torch.sort(dest, stable=True).indices
    d = dest[order]
    first = torch.searchsorted(d, d, right=False)
    occ = torch.arange(d.numel(), device=d.device) - first
    m = int(occ.max()) + 1 if d.numel() else 1
    table = torch.full((size, m), -1, dtype=torch.int32, device=dest.device)
    table[d, occ] = order.to(torch.int32)
    return table


def ring_plan(layout: DocumentLayout, split: CPSplit, rank: int) -> RingPlan:
    """This rank's square and rectangle calls and index maps (cached on the layout)."""
    key = (RingPlan, split, rank)
    if key in layout._cache:
        return layout._cache[key]
    s, sl, b, dev = layout.seq_len, split.local_len, layout.batch, layout.device
    ps = pieces(layout, split, rank)
    n = tuple(p.q1 - p.q0 for p in ps)
    rect = tuple((p.k1 - (p.q1 - p.q0)) - p.k0 for p in ps)  # keys before the piece's queries
    any_rect = any(p.k1 - (p.q1 - p.q0) > p.k0 for r in range(split.cp_size)
                   for p in pieces(layout, split, r))
    natural = split.natural()
    rows, rect_nat, rect_gat = [], [], []
    for p, w in zip(ps, rect):
        if w > 0:
            rows.append(torch.arange(p.row * sl + p.q0, p.row * sl + p.q1))
            pos = torch.arange(p.k0, p.k0 + w)
            rect_nat.append(p.row * s + pos)
            nat = natural[p.row, pos]
            rect_gat.append((nat // sl) * (b * sl) + p.row * sl + nat % sl)
    cat = lambda xs: (torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64)).to(dev)
    local = split.indices(rank) + torch.arange(b).unsqueeze(1) * s
    plan = RingPlan(
        square=Part(n, n, n, True),
        rect=Part(tuple(x if w > 0 else 0 for x, w in zip(n, rect)),
                  tuple(max(w, 0) for w in rect), n, False) if rows else None,
        any_rect=any_rect, rows=cat(rows), rect_natural=cat(rect_nat),
        rect_gathered=cat(rect_gat), local_natural=local.reshape(-1).to(dev), size=b * s,
    )
    layout._cache[key] = plan
    return plan


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``[s, b, h, d]`` -> ``[b * s, h, d]`` contiguous (rows back to back)."""
    return t.transpose(0, 1).reshape(-1, t.shape[2], t.shape[3]).contiguous()


def _unflat(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.view(b, -1, t.shape[1], t.shape[2]).transpose(0, 1)


class _Collective:
    """The real CP group: async all-gather of K/V, async reduce-scatter of dK/dV."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.gloo = dist.get_backend(group) == "gloo"

    def gather(self, kv: torch.Tensor):
        out = kv.new_empty((self.world * kv.shape[0],) + tuple(kv.shape[1:]))
        if self.gloo:
            work = dist.all_gather(list(out.chunk(self.world)), kv, group=self.group, async_op=True)
        else:
            work = dist.all_gather_into_tensor(out, kv, group=self.group, async_op=True)
        return out, work

    def reduce(self, x: torch.Tensor):
        n = x.shape[0] // self.world
        if self.gloo:  # no reduce-scatter in gloo: all-reduce, keep this rank's slice
            work = dist.all_reduce(x, group=self.group, async_op=True)
            return x.narrow(0, dist.get_rank(self.group) * n, n), work
        out = x.new_empty((n,) + tuple(x.shape[1:]))
        return out, dist.reduce_scatter_tensor(out, x, group=self.group, async_op=True)


class _RingAttention(torch.autograd.Function):
    """``comm`` a :class:`_Collective` (k, v: this rank's tokens) or None (k, v: the whole
    sequence, natural order; one rank computed alone, as the CP benchmark and tests do)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, kernel, comm, scale):
        b, hkv = q.shape[1], k.shape[2]
        qf = _flat(q)
        if comm is None:  # the whole K/V is here already: no copy a real rank would not make
            k_all, v_all = _flat(k), _flat(v)
            kf, vf = k_all.index_select(0, plan.local_natural), v_all.index_select(0, plan.local_natural)
            gathered = (k_all, v_all)
        else:
            kf, vf = _flat(k), _flat(v)
            gathered = work = None
            if plan.any_rect:
                gathered, work = comm.gather(torch.cat([kf, vf], dim=1))
        o, lse = kernel.partial_forward(plan.square, qf, kf, vf, scale)
        if comm is not None and work is not None:
            work.wait()
        rect_kv = ()
        if plan.rect is not None:
            rect_kv = _rect_kv(gathered, plan, comm is None, hkv, getattr(kernel, "key_align", 1))
            o_r, lse_r = kernel.partial_forward(plan.rect, qf, *rect_kv, scale)
            merge_(o, lse, o_r, lse_r, plan.rows)
        # the rectangles' keys, not the gathered stream: no more keys than it (a rank's
        # rectangles of one document hold fewer keys than the document; the buffers round up to
        # the kernel's packing unit), far fewer when most documents are whole, and the backward
        # needs no second gather
        ctx.save_for_backward(qf, kf, vf, o, lse, *rect_kv)
        ctx.plan, ctx.kernel, ctx.comm, ctx.scale, ctx.b = plan, kernel, comm, scale, b
        return _unflat(o, b)

    @staticmethod
    def backward(ctx, do):
        qf, kf, vf, o, lse, *rest = ctx.saved_tensors
        plan, kernel, comm, scale = ctx.plan, ctx.kernel, ctx.comm, ctx.scale
        hkv, d = kf.shape[1], kf.shape[2]
        dof = _flat(do)
        dq_r = dk_r = dv_r = None
        if plan.rect is not None:
            kr, vr = rest
            dq_r, dk_r, dv_r = kernel.partial_backward(plan.rect, qf, kr, vr, o, lse, dof, scale)
            n = plan.rect_natural.numel()  # the key buffers' alignment rows carry nothing
            dk_r, dv_r = dk_r[:n], dv_r[:n]
        empty = kf.new_zeros((0, hkv, d))
        pending = None
        if comm is not None and plan.any_rect:
            dkv = kf.new_empty((plan.size, 2 * hkv, d))
            gather_sum(dkv[:, :hkv], dk_r if dk_r is not None else empty, plan.table_gathered)
            gather_sum(dkv[:, hkv:], dv_r if dv_r is not None else empty, plan.table_gathered)
            pending = comm.reduce(dkv)
        dq, dk, dv = kernel.partial_backward(plan.square, qf, kf, vf, o, lse, dof, scale)
        if dq_r is not None:
            add_rows_(dq, dq_r, plan.rows)
        if comm is None:  # gradients of the whole K/V: rectangles' and squares' contributions
            dk_all, dv_all = (kf.new_empty((plan.size, hkv, d)) for _ in range(2))
            for out, r, sq in ((dk_all, dk_r, dk), (dv_all, dv_r, dv)):
                gather_sum(out, torch.cat([r if r is not None else empty, sq]), plan.table_natural)
            dk, dv = dk_all, dv_all
        elif pending is not None:
            red, work = pending
            work.wait()
            dk, dv = dk + red[:, :hkv], dv + red[:, hkv:]
        b = ctx.b
        return _unflat(dq, b), _unflat(dk, b), _unflat(dv, b), None, None, None, None


def _rect_kv(gathered, plan: RingPlan, natural: bool, hkv: int, align: int):
    """The rectangles' keys and values: from the whole K and V in natural order (one rank
    computed alone), or from the all-gathered ``[k | v]`` stream (rank-major); in buffers of a
    multiple of ``align`` rows (zeros after the keys), the kernel's packing unit, so it needs no
    padded copy."""
    index = plan.rect_natural if natural else plan.rect_gathered
    n = index.numel()
    srcs = gathered if natural else (gathered[:, :hkv], gathered[:, hkv:])
    out = []
    for src in srcs:
        buf = src.new_empty((-(-n // align) * align,) + tuple(src.shape[1:]))
        torch.index_select(src, 0, index, out=buf[:n])
        buf[n:].zero_()
        out.append(buf)
    return tuple(out)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                   split: CPSplit, rank: int, kernel, scale: float, group=None) -> torch.Tensor:
    """This rank's queries ``[s / C, b, hq, d]`` -> ``[s / C, b, hq, d]``. With ``group``: k/v
    are this rank's tokens and are exchanged over it; without: k/v are the whole sequence."""
    plan = ring_plan(layout, split, rank)
    comm = _Collective(group) if group is not None else None
    return _RingAttention.apply(q, k, v, plan, kernel, comm, scale)
