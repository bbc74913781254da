"""A checkpoint's tokenizer and end-of-sequence ids for evaluation (the model itself is loaded by
:func:`megatron_prolong.inference.load_model`), and one packed line run the way training does
(document layout, zigzag CP shards)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prolong import inference
from megatron_prolong.attention.context_parallel import zigzag_indices
from megatron_prolong.attention.layout import DocumentLayout
from megatron_prolong.eval.rows import EvalInputError, boundaries
from megatron_prolong.model.packed import DocumentPackedSeqParams, rope_positions
from megatron_prolong.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, as_id_list, unique_ids


def load_tokenizer(checkpoint: str | Path) -> Tokenizer:
    """The tokenizer the checkpoint was trained with (its Hugging Face folder, or the byte tokenizer)."""
    ckpt, meta = inference.read_checkpoint(checkpoint)
    if (meta.get("tokenizer") or {}).get("kind", "byte") == "byte":
        return ByteTokenizer()
    folder = inference.checkpoint_tokenizer(ckpt, meta)
    if folder is None:
        raise EvalInputError(
            f"{ckpt}: its tokenizer ({meta['tokenizer'].get('path')}) is not there and the checkpoint has no "
            f"tokenizer/ copy; copy the Hugging Face tokenizer folder to {ckpt}/tokenizer")
    return HFTokenizer(str(folder))


def eos_ids(checkpoint: str | Path, tokenizer: Tokenizer) -> list[int]:
    """Every id that ends generation: the tokenizer's (its EOS and its folder's generation_config.json),
    the checkpoint's record and its own generation_config.json (e.g. Llama-3-Instruct's
    <|end_of_text|> and <|eot_id|>)."""
    ckpt, meta = inference.read_checkpoint(checkpoint)
    gen = ckpt / "generation_config.json"
    saved = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    recorded = (meta.get("tokenizer") or {}).get("eos_token_id")
    return unique_ids([*tokenizer.eos_ids, *as_id_list(recorded), *as_id_list(saved)])


@dataclass
class PackedLine:
    """One packed line as this rank feeds it to the model (its zigzag share under CP)."""

    ids: torch.Tensor  # [1, s_local]
    packed: DocumentPackedSeqParams
    index: torch.Tensor  # [s_local] global position of each local token
    length: int  # real tokens (before padding to a multiple of 2 x CP)
    padded: int  # s


def padded_length(n: int, cp: int) -> int:
    """A line of ``n`` tokens padded for the zigzag CP split (2 x CP chunks); unpadded at CP = 1."""
    multiple = 2 * cp if cp > 1 else 1
    return -(-n // multiple) * multiple


def packed_line(tokens: Sequence[int], indices, vocab_size: int, rope_mode: str, device) -> PackedLine:
    """Document layout, RoPE positions and this CP rank's shard of one line (padding is its own document)."""
    from megatron.core import parallel_state

    n = len(tokens)
    if any(not 0 <= int(t) < vocab_size for t in tokens):
        raise EvalInputError(f"input_ids must be in [0, {vocab_size}) for this checkpoint")
    cuts = boundaries(n, indices)
    cp = parallel_state.get_context_parallel_world_size()
    s = padded_length(n, cp)
    if s > n:
        cuts = cuts + [s]
    ids = torch.zeros(1, s, dtype=torch.long, device=device)
    ids[0, :n] = torch.as_tensor(list(tokens), dtype=torch.long)
    layout = DocumentLayout.from_cu_seqlens(torch.tensor([cuts], dtype=torch.int32, device=device), s)
    positions = rope_positions(layout, rope_mode)
    idx = zigzag_indices(s, cp, parallel_state.get_context_parallel_rank(), device=device)
    packed = DocumentPackedSeqParams(qkv_format="sbhd", layout=layout, positions=positions[:, idx].t().contiguous())
    return PackedLine(ids[:, idx], packed, idx, n, s)


def forward_hidden(gpt, ids: torch.Tensor, packed) -> torch.Tensor:
    """Final hidden states [s_local, b, h] (after the final norm); the output layer is left to the caller."""
    post = gpt.post_process
    gpt.post_process = False
    try:
        return gpt(ids, None, None, packed_seq_params=packed)
    finally:
        gpt.post_process = post


def output_logits(gpt, hidden: torch.Tensor) -> torch.Tensor:
    """This TP rank's vocabulary columns of the logits, [s, b, V / tp]."""
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    logits, _ = gpt.output_layer(hidden, weight=weight, runtime_gather_output=False)
    return logits


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """log softmax(logits)[target] over the real vocabulary; logits [n, V/tp] are this TP rank's columns."""
    from megatron.core import parallel_state

    logits = logits.float()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    width = logits.shape[-1]
    lo = tp_rank * width
    cols = torch.arange(lo, lo + width, device=logits.device)
    logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    mx = logits.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=tp_group)
    sumexp = torch.exp(logits - mx[:, None]).sum(dim=-1)
    local = (targets >= lo) & (targets < lo + width)
    tgt = torch.where(local, logits.gather(1, (targets - lo).clamp(0, width - 1)[:, None])[:, 0],
                      torch.zeros_like(mx))
    if tp > 1:
        dist.all_reduce(sumexp, group=tp_group)
        dist.all_reduce(tgt, group=tp_group)
    return tgt - mx - torch.log(sumexp)


def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """argmax over the real vocabulary of TP-sharded logits [n, V/tp] (ties: the lowest id, as torch.argmax)."""
    from megatron.core import parallel_state

    width = logits.shape[-1]
    lo = parallel_state.get_tensor_model_parallel_rank() * width
    cols = torch.arange(lo, lo + width, device=logits.device)
    logits = logits.float().masked_fill(cols >= vocab_size, float("-inf"))
    best, arg = logits.max(dim=-1)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if tp == 1:
        return arg
    pair = torch.stack([best.double(), (arg + lo).double()], dim=-1)
    parts = [torch.empty_like(pair) for _ in range(tp)]
    dist.all_gather(parts, pair, group=tp_group)
    stacked = torch.stack(parts)  # [tp, n, 2]; ranks in vocabulary order, so the first max is the lowest id
    winner = stacked[..., 0].argmax(dim=0)
    return stacked[..., 1].gather(0, winner[None])[0].long()
