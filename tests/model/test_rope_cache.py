"""The RoPE angles are built once per micro-batch for the whole model, not once per layer, and an
earlier micro-batch's are released while its DocumentPackedSeqParams is still alive (the trainer
keeps every micro-batch of a step in a list until the step ends)."""

from __future__ import annotations

import gc
import weakref

import torch

from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig

LAYERS, S = 4, 32


def test_angles_built_once_per_micro_batch_and_released(megatron, monkeypatch):
    from megatron_prolong.attention.layout import DocumentLayout
    from megatron_prolong.model import core_attention
    from megatron_prolong.model.builder import build_model, build_transformer_config
    from megatron_prolong.model.packed import DocumentPackedSeqParams, rope_positions

    model_cfg = ModelConfig(num_layers=LAYERS, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2)
    tcfg = build_transformer_config(model_cfg, ParallelConfig(), TrainConfig(precision="fp32"))
    model = build_model(model_cfg, tcfg, vocab_size=300, seq_length=S, seed=3)

    # Every angle tensor the layers rotate q and k with, as the layers receive it (not how it is made).
    seen: list[weakref.ref] = []
    rope = core_attention.apply_rope

    def recording(query, key, emb, impl):
        if not any(r() is emb for r in seen):
            seen.append(weakref.ref(emb))
        return rope(query, key, emb, impl)

    monkeypatch.setattr(core_attention, "apply_rope", recording)
    g = torch.Generator().manual_seed(0)

    def micro_batch(cuts, mode):
        layout = DocumentLayout.from_cu_seqlens(torch.tensor([cuts], dtype=torch.int32), S)
        return DocumentPackedSeqParams(qkv_format="sbhd", layout=layout,
                                       positions=rope_positions(layout, mode).t().contiguous())

    def step(packed):
        tokens = torch.randint(0, 300, (1, S), generator=g)
        model(tokens, None, None, labels=tokens, packed_seq_params=packed).sum().backward()

    # Kept alive, as the trainer's list of the step's micro-batches keeps them.
    batches = [micro_batch([0, 10, S], "per_document"), micro_batch([0, S, S], "continuous")]
    step(batches[0])
    assert len(seen) == 1, f"{len(seen)} angle tensors built for one micro-batch of {LAYERS} layers"
    first = seen[0]
    step(batches[1])
    assert len(seen) == 2, "the second micro-batch reuses no angles of the first, and builds them once"
    gc.collect()
    released = first() is None
    assert released, "the first micro-batch's angles are still held after the second one ran"
    assert seen[1]() is not None  # the latest micro-batch's stay cached

    # The same micro-batch again (activation recompute, generation's prefill): no rebuild.
    step(batches[1])
    assert len(seen) == 2
