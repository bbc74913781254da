"""Document-masked causal attention: pick a backend, plan, run.

Token ``i`` attends to token ``j`` iff both are in the same document and ``j <= i`` (positions
global in the packed row). Tensors use Megatron's ``sbhd`` layout. With a context-parallel group
of size ``C > 1`` each rank holds ``s / C`` query tokens per row as a
:class:`~.split.CPSplit` says. The ``reference`` and ``cudnn`` kernels run a rank's pieces as
causal squares on its own tokens plus unmasked rectangles against the all-gathered earlier keys
(:mod:`.ring`); ``flex`` attends to the all-gathered keys with one mask. Positions are global
(no padding; documents may cross chunk and rank boundaries).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backends import cached_plan, cudnn_thd
from .backends.cudnn import CudnnBackend
from .backends.flex import FlexBackend
from .backends.reference import ReferenceBackend
from .backends.sdpa import SdpaBackend, attend_piece
from .config import KERNELS, AttentionConfig
from .context_parallel import gather_kv
from .layout import DocumentLayout
from .ring import ring_attention, ring_plan
from .split import CPSplit, zigzag_split

BACKENDS = {b.name: b for b in (ReferenceBackend(), SdpaBackend(), FlexBackend(), CudnnBackend())}
#: kernels that run CP as per-rank square + rectangle calls (ring.py); the others attend to the
#: all-gathered keys with one mask
RING_KERNELS = ("reference", "cudnn")
logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()


@dataclass(frozen=True)
class AutoRule:
    """``auto`` takes the first rule that matches (None: any)."""

    backend: str
    cuda: bool | None = None
    cp: bool | None = None  # context parallel (C > 1)
    single_document: bool | None = None  # every row one document
    half: bool | None = None  # fp16 / bf16 inputs
    cudnn: bool = False  # cudnn-frontend importable, not switched off, head dim it takes


#: fastest measured per case; the numbers are in docs/benchmarks.md ("The auto rule")
AUTO_RULES = (
    AutoRule("reference", cuda=False),
    AutoRule("sdpa", cp=False, single_document=True),
    AutoRule("cudnn", half=True, cudnn=True),
    AutoRule("flex"),
)


def resolve_backend(
    backend: str, device: torch.device, layout: DocumentLayout, cp_size: int = 1, *,
    dtype: torch.dtype | None = None, head_dim: int | None = None,
) -> str:
    """The backend ``auto`` stands for (others are returned as given, after a name check).
    ``dtype`` / ``head_dim`` None: not known, taken as suitable."""
    if backend not in KERNELS:
        raise ValueError(f"unknown attention kernel {backend!r}; choose one of {KERNELS}")
    if backend != "auto":
        return backend
    facts = dict(
        cuda=torch.device(device).type == "cuda", cp=cp_size > 1,
        single_document=layout.is_single_document(),
        half=dtype is None or dtype in (torch.float16, torch.bfloat16),
    )
    cudnn_ok = cudnn_thd.DISABLED is None and cudnn_thd.available() and (
        dtype is None or head_dim is None or cudnn_thd.supports(dtype, head_dim))
    for rule in AUTO_RULES:
        if all(getattr(rule, k) in (None, v) for k, v in facts.items()) and (cudnn_ok or not rule.cudnn):
            return rule.backend
    raise AssertionError("the last auto rule matches everything")


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout, *,
    cp_group=None, split: CPSplit | None = None, config: AttentionConfig | None = None,
    backend: str | None = None, softmax_scale: float | None = None,
) -> torch.Tensor:
    """Document-masked causal attention.

    q: ``[s_local, b, hq, d]``; k, v: ``[s_local, b, hkv, d]`` (``hq % hkv == 0``). With a CP
    group of size C > 1, ``s_local = s / C`` and the local tokens are this rank's share of
    ``split`` (default: zigzag). ``backend`` overrides ``config.kernel``. Returns
    ``[s_local, b, hq * d]``.
    """
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    if cp_size == 1:
        return attend_gathered(q, k, v, layout, split=split, config=config, backend=backend,
                               softmax_scale=softmax_scale)
    cp_rank = dist.get_rank(cp_group)
    cfg = config or AttentionConfig()
    split = split if split is not None else zigzag_split(layout, cp_size)
    _check_shapes(q, k, v, layout, split, local_kv=True)
    layout = _on_device(layout, q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = _agreed_kernel(backend or cfg.kernel, q, k, layout, split, cp_rank, cfg, scale, cp_group)
    if name in RING_KERNELS:
        out = ring_attention(q, k, v, layout, split, cp_rank, BACKENDS[name].for_config(cfg),
                             scale, group=cp_group)
    else:
        k, v = gather_kv(k, v, cp_group, split)
        out = _run(name, q, k, v, layout, split, cp_rank, cfg, scale)
    return out.reshape(q.shape[0], q.shape[1], -1)


def attend_gathered(
    q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, layout: DocumentLayout, *,
    split: CPSplit | None = None, cp_size: int = 1, cp_rank: int = 0,
    config: AttentionConfig | None = None, backend: str | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """This rank's queries against the full, natural-order K/V, computed alone (no
    communication): CP = 1, and one CP rank timed or checked on one device. ``split``
    defaults to the zigzag split over ``cp_size`` ranks."""
    cfg = config or AttentionConfig()
    split = split if split is not None else zigzag_split(layout, cp_size)
    _check_shapes(q, k_full, v_full, layout, split)
    layout = _on_device(layout, q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    asked = backend or cfg.kernel
    name = _resolve(asked, q, layout, split.cp_size)
    try:
        out = _compute(name, q, k_full, v_full, layout, split, cp_rank, cfg, scale)
    except cudnn_thd.GraphBuildError as e:
        if asked != "auto":
            raise
        # cuDNN cannot build the graphs here: off for this process (nothing ran yet, nothing to
        # undo), and auto's next rule from now on
        cudnn_thd.disable(str(e))
        name = _resolve("auto", q, layout, split.cp_size)
        _log_once(logging.WARNING, f"attention: {e}; kernel auto uses {name!r} from now on")
        out = _compute(name, q, k_full, v_full, layout, split, cp_rank, cfg, scale)
    return out.reshape(q.shape[0], q.shape[1], -1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """One document per row, the last ``n`` of its ``L`` tokens new: q ``[n, b, hq, d]``
    against k/v ``[L, b, hkv, d]`` (the cache followed by the new tokens, after RoPE), causal
    aligned bottom-right (KV-cache generation). Returns ``[n, b, hq * d]``."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = attend_piece(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), scale)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _resolve(asked: str, q: torch.Tensor, layout: DocumentLayout, cp_size: int,
             log: bool = True) -> str:
    name = resolve_backend(asked, q.device, layout, cp_size, dtype=q.dtype, head_dim=q.shape[-1])
    if log:
        _log_once(logging.INFO, f"attention: kernel {name!r} (asked {asked!r}) for "
                  f"{'one-document' if layout.is_single_document() else 'packed'} rows at CP = "
                  f"{cp_size}" + (": square + rectangle calls" if cp_size > 1 and name in RING_KERNELS else ""))
    return name


def _compute(name, q, k_full, v_full, layout, split, rank, cfg, scale):
    if split.cp_size > 1 and name in RING_KERNELS:
        return ring_attention(q, k_full, v_full, layout, split, rank,
                              BACKENDS[name].for_config(cfg), scale)
    return _run(name, q, k_full, v_full, layout, split, rank, cfg, scale)


def _agreed_kernel(asked, q, k, layout, split, rank, cfg, scale, group) -> str:
    """The kernel every rank of the CP group runs for this layout (decided once per layout).
    ``auto``: each rank's choice, cuDNN only where its graphs for this rank's calls build; the
    group takes the first fallback any rank needed, so no two ranks run different kernels."""
    key = ("kernel", asked, id(group), str(q.device), q.dtype, tuple(q.shape[1:]), k.shape[2])
    if key in layout._cache:
        return layout._cache[key]
    name = _resolve(asked, q, layout, split.cp_size, log=rank == 0)
    failed = None
    if name == "cudnn":
        kernel = BACKENDS["cudnn"].for_config(cfg)
        plan = ring_plan(layout, split, rank)
        try:
            for part in (plan.square, plan.rect):
                if part is not None:
                    kernel.graphs(part, q.new_empty((0,) + tuple(q.shape[2:])),
                                  k.new_empty((0,) + tuple(k.shape[2:])), scale)
        except cudnn_thd.GraphBuildError as e:
            if asked != "auto":
                raise
            failed = str(e)
    if asked == "auto":
        name = agree_kernel(name, failed, group, q.device)
    layout._cache[key] = name
    return name


def agree_kernel(name: str, failed: str | None, group, device) -> str:
    """The kernel the whole CP group runs: each rank's auto choice (``failed``: why this rank
    cannot run it, so it needs the next rule), the group taking the latest fallback any rank
    needed (one MAX all-reduce). Logged once where it differs from this rank's choice."""
    order = [r.backend for r in AUTO_RULES]
    mine = order.index(name) + (failed is not None)
    vote = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=group)
    agreed = order[int(vote)]
    if agreed != name:
        reason = failed or "another rank of the CP group cannot run it"
        if name == "cudnn":
            cudnn_thd.disable(reason)
        _log_once(logging.WARNING, f"attention: kernel {name!r} not used under CP ({reason}); "
                  f"every rank of the CP group runs {agreed!r} from now on")
    return agreed


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def _run(name, q, k, v, layout, split, rank, cfg, scale):
    impl = BACKENDS[name]
    return impl.run(cached_plan(impl, layout, split, rank, cfg), q, k, v, scale)


def _check_shapes(q, k, v, layout, split, local_kv: bool = False):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [s, b, heads, dim]")
    s_local, b, hq, d = q.shape
    s, bk, hkv, dk = k.shape
    s = s * split.cp_size if local_kv else s
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    if hq % hkv != 0:
        raise ValueError(f"query heads {hq} not divisible by key/value heads {hkv}")
    if layout.doc_ids.shape != (b, s):
        raise ValueError(
            f"layout is {tuple(layout.doc_ids.shape)} but the batch is b={b}, s={s} (full length)")
    if split.seq_len != s or s_local != split.local_len:
        raise ValueError(f"local length {s_local} x cp_size {split.cp_size} != sequence length {s}")


def _on_device(layout: DocumentLayout, device: torch.device) -> DocumentLayout:
    if layout.device == device:
        return layout
    key = (DocumentLayout, str(device))
    if key not in layout._cache:
        layout._cache[key] = layout.to(device)
    return layout._cache[key]
