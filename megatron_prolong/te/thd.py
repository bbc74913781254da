"""Transformer Engine THD packing rules and context-parallel validation (pure Python, no TE).

TE's packed (THD) attention with context parallelism, as Megatron-Core drives it, follows these
rules (read from TE's ``thd_partition_indices_kernel`` in
``transformer_engine/common/fused_attn/context_parallel.cu`` and its
``pad_thd_sequences_for_cp`` helper):

1. Padding. Every document of length ``L`` is padded at its end to ``P = ceil(L / 2C) * 2C``
   tokens (``C`` = context-parallel size; with ``C == 1`` TE needs no padding, and the rule
   gives ``P = ceil(L / 2) * 2``; we use ``P = L`` there). ``cu_seqlens`` keeps the real lengths,
   ``cu_seqlens_padded`` (Megatron's ``cu_seqlens_q_padded`` / ``cu_seqlens_kv_padded``) the
   padded ones; the token stream is laid out by ``cu_seqlens_padded`` and the padding tokens
   sit at ``[cu_padded[i] + L_i, cu_padded[i+1])``. Padding must be dropped from the loss.
2. CP split. Each padded document is cut into ``2C`` chunks of ``P / 2C`` tokens; rank ``r``
   holds chunks ``r`` and ``2C-1-r`` of *every* document, documents in order. So rank ``r``'s
   local stream has ``sum(P_i) / C`` tokens, and local token ``t`` in document ``i`` at offset
   ``o = t - cu_padded[i] / C`` is global token ``cu_padded[i] + o + r * P_i/2C`` if
   ``o < P_i/2C``, else ``cu_padded[i] + o + (2C-2-r) * P_i/2C``.
3. The rows of a micro-batch are concatenated into one THD batch (batch dimension 1).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Sequence

import torch

VALID_CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
# The first TE release whose context-parallel attention takes THD (packed) batches with each
# cp_comm_type; older ones assert in ``attn_forward_func_with_cp`` (transformer_engine/pytorch/
# attention/dot_product_attention/context_parallel.py): all_gather "No support for
# cp_comm_type='all_gather' and qkv_format='thd'" up to 2.17, a2a "thd format is not supported!"
# up to 2.9, a2a+p2p "thd format is not supported with hierarchical CP implementation yet!" up
# to 2.18. p2p takes THD in every release setup.cfg allows (>= 2.8).
MIN_TE_FOR_THD_CP = {"p2p": (2, 8), "a2a": (2, 10), "all_gather": (2, 18), "a2a+p2p": (2, 19)}


def padded_length(length: int, cp_size: int) -> int:
    """Length of a document after TE's CP padding (a multiple of 2 x cp_size)."""
    if cp_size <= 1:
        return length
    m = 2 * cp_size
    return -(-length // m) * m


def te_thd_partitioned_indices(
    cu_seqlens_padded: Sequence[int] | torch.Tensor, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Positions in the padded THD stream held by ``cp_rank`` (TE's ``thd_get_partitioned_indices``
    rule, rule 2 of the module docstring). int64."""
    cu = [int(x) for x in (cu_seqlens_padded.tolist() if isinstance(cu_seqlens_padded, torch.Tensor)
                           else cu_seqlens_padded)]
    if cp_size == 1:
        return torch.arange(cu[-1])
    parts = []
    for a, b in zip(cu[:-1], cu[1:]):
        p = b - a
        if p % (2 * cp_size) != 0:
            raise ValueError(f"padded document length {p} not divisible by 2 x cp_size")
        h = p // (2 * cp_size)
        parts.append(torch.arange(a + cp_rank * h, a + (cp_rank + 1) * h))
        parts.append(torch.arange(a + (2 * cp_size - 1 - cp_rank) * h, a + (2 * cp_size - cp_rank) * h))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class THDPacking:
    """TE THD layout of one micro-batch (rows concatenated).

    ``cu_seqlens`` / ``cu_seqlens_padded``: int32, real and padded cumulative lengths.
    ``source_index``: int64 ``[total_padded]``, for each padded-stream token the index of the
    token it holds in the flattened ``[b * s]`` input stream (row-major), or -1 for padding.
    ``is_padding``: bool ``[total_padded]``.
    """

    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    source_index: torch.Tensor
    is_padding: torch.Tensor
    cp_size: int
    max_seqlen: int
    max_seqlen_padded: int

    @property
    def total_padded(self) -> int:
        return int(self.cu_seqlens_padded[-1])

    def pack(self, x: torch.Tensor, dim: int = 0, pad_value=0) -> torch.Tensor:
        """Flattened ``[b*s, ...]`` (along ``dim``) -> padded stream, padding filled with
        ``pad_value`` (use the ignore label / 0 loss mask for labels and masks)."""
        idx = self.source_index.to(x.device).clamp(min=0)
        out = x.index_select(dim, idx)
        shape = [1] * out.dim()
        shape[dim] = -1
        pad = self.is_padding.to(x.device).view(shape)
        return torch.where(pad, torch.as_tensor(pad_value, dtype=x.dtype, device=x.device), out)

    def unpack(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Padded stream -> flattened ``[b*s, ...]`` (drops padding)."""
        keep = torch.nonzero(~self.is_padding).flatten().to(x.device)
        return x.index_select(dim, keep)

    def partition_indices(self, cp_rank: int) -> torch.Tensor:
        return te_thd_partitioned_indices(self.cu_seqlens_padded, self.cp_size, cp_rank)

    def shard(self, x_padded: torch.Tensor, cp_rank: int, dim: int = 0) -> torch.Tensor:
        """This rank's tokens of a padded-stream tensor (what ``get_batch_on_this_cp_rank`` gives
        TE for THD)."""
        return x_padded.index_select(dim, self.partition_indices(cp_rank).to(x_padded.device))


def te_thd_packing(
    cu_seqlens_rows: Sequence[Sequence[int] | torch.Tensor], cp_size: int
) -> THDPacking:
    """TE THD packing of a micro-batch given per-row cumulative lengths (each ``0 ... s``)."""
    rows = [[int(x) for x in (r.tolist() if isinstance(r, torch.Tensor) else r)] for r in cu_seqlens_rows]
    if not rows:
        raise ValueError("no rows")
    s = rows[0][-1]
    cu, cup, src = [0], [0], []
    for r, row in enumerate(rows):
        if row[0] != 0 or row[-1] != s:
            raise ValueError(f"row {r}: cu_seqlens must run from 0 to {s}")
        for a, b in zip(row[:-1], row[1:]):
            if b <= a:
                if b < a:
                    raise ValueError(f"row {r}: cu_seqlens must be non-decreasing")
                continue
            L = b - a
            P = padded_length(L, cp_size)
            cu.append(cu[-1] + L)
            cup.append(cup[-1] + P)
            src.append(torch.arange(r * s + a, r * s + b))
            src.append(torch.full((P - L,), -1, dtype=torch.long))
    source = torch.cat(src)
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    plens = [b - a for a, b in zip(cup[:-1], cup[1:])]
    return THDPacking(
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(cup, dtype=torch.int32),
        source_index=source,
        is_padding=source < 0,
        cp_size=cp_size,
        max_seqlen=max(lens),
        max_seqlen_padded=max(plens),
    )


# ---------------------------------------------------------------------- validation
def installed_te_version() -> str | None:
    """The installed Transformer Engine's version string, or None when it is not installed."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    for dist in ("transformer-engine", "transformer-engine-torch", "transformer-engine-cu12",
                 "transformer-engine-cu13"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import transformer_engine  # a source build without package metadata

    return str(transformer_engine.__version__)


def release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def validate_te_version(cp_comm_type: str | Sequence[str], cp_size: int) -> None:
    """``model.attention_backend=te`` feeds TE THD batches; refuse a TE too old for them with the
    configured ``parallel.cp_comm_type``, or no TE at all. Raises ValueError with the fix."""
    version = installed_te_version()
    if version is None:
        raise ValueError(
            "model.attention_backend=te but Transformer Engine is not installed; install the `te` extra "
            "(pip install 'megatron-prolong[te]') or use model.attention_backend=plugin"
        )
    if cp_size <= 1:
        return
    kinds = [cp_comm_type] if isinstance(cp_comm_type, str) else list(cp_comm_type)
    for kind in kinds:
        need = MIN_TE_FOR_THD_CP.get(kind)
        if need is not None and release(version) < need:
            raise ValueError(
                f"model.attention_backend=te with parallel.cp_comm_type={kind} and parallel.cp={cp_size} needs "
                f"Transformer Engine >= {need[0]}.{need[1]} for THD (packed-document) batches; installed: "
                f"{version}. Upgrade TE (pip install 'transformer-engine[pytorch]>={need[0]}.{need[1]}'), set "
                f"parallel.cp_comm_type=p2p, or use model.attention_backend=plugin"
            )


def validate_context_parallel(seq_len: int, cp_size: int) -> None:
    """The sequence must split into 2 x CP equal chunks (zigzag load balancing)."""
    if cp_size < 1:
        raise ValueError(f"context_parallel_size must be >= 1, got {cp_size}")
    if cp_size > 1 and seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"seq_length={seq_len} is not divisible by 2 x context_parallel_size = {2 * cp_size}: "
            f"choose a CP size whose double divides the sequence length, or change seq_length"
        )


def validate_cp_comm_type(
    cp_comm_type: str | Sequence[str] | None,
    cp_size: int,
    num_query_heads: int,
    num_kv_heads: int,
    hierarchical_cp_sizes: Sequence[int] | None = None,
) -> None:
    """Reject TE ``cp_comm_type`` settings that fail or silently misbehave.

    ``cp_comm_type`` may be one string or one per layer. Head counts are per tensor-parallel
    rank (what each CP group sees). Raises ValueError with a fix-it message.
    """
    if cp_comm_type is None:
        return
    kinds = [cp_comm_type] if isinstance(cp_comm_type, str) else list(cp_comm_type)
    for kind in kinds:
        if kind not in VALID_CP_COMM_TYPES:
            hint = ""
            norm = str(kind).replace("-", "_").replace(" ", "").lower()
            if norm in ("allgather", "all_gather", "ag"):
                hint = " (TE spells it 'all_gather', with an underscore)"
            elif norm in ("a2ap2p", "a2a_p2p", "a2a+p2p"):
                hint = " (TE spells it 'a2a+p2p')"
            elif norm in ("ring", "p_2_p"):
                hint = " ('p2p' is TE's ring)"
            raise ValueError(
                f"cp_comm_type={kind!r} is not valid; use one of {', '.join(VALID_CP_COMM_TYPES)}{hint}"
            )
        if cp_size <= 1:
            continue
        if kind == "a2a+p2p":
            hs = list(hierarchical_cp_sizes or [])
            prod = 1
            for x in hs:
                prod *= int(x)
            if len(hs) < 2 or prod != cp_size:
                raise ValueError(
                    f"cp_comm_type='a2a+p2p' needs hierarchical_context_parallel_sizes with at least "
                    f"two levels whose product is context_parallel_size={cp_size} (got {hs or None}); "
                    f"without them Megatron silently runs without context parallelism. Set e.g. "
                    f"hierarchical_context_parallel_sizes=[{_split_hint(cp_size)}], or use 'p2p' / "
                    f"'all_gather'"
                )
            a2a_size = int(hs[0])
            _check_heads("a2a+p2p (its a2a level)", a2a_size, num_query_heads, num_kv_heads)
        elif kind == "a2a":
            _check_heads("a2a", cp_size, num_query_heads, num_kv_heads)


def _check_heads(what: str, size: int, hq: int, hkv: int) -> None:
    bad = [f"{name}={n}" for name, n in (("query heads", hq), ("key/value heads", hkv)) if n % size]
    if bad:
        raise ValueError(
            f"cp_comm_type={what} scatters attention heads over {size} ranks, but "
            f"{' and '.join(bad)} (per tensor-parallel rank) is not divisible by {size}; use "
            f"'p2p' or 'all_gather', or a CP size that divides the head counts"
        )


def _split_hint(cp: int) -> str:
    for a in (2, 4, 8):
        if cp % a == 0 and cp // a > 1:
            return f"{a}, {cp // a}"
    return f"1, {cp}"
