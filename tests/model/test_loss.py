"""The blockwise output layer + loss equals Megatron's full-logits loss, value and gradients."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig


@pytest.mark.parametrize("untie", [True, False])
@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_blockwise_equals_full(megatron, untie, block):
    from megatron_prolong.attention.layout import DocumentLayout
    from megatron_prolong.model.builder import build_model, build_transformer_config
    from megatron_prolong.model.loss import BlockwiseLoss
    from megatron_prolong.model.packed import DocumentPackedSeqParams, rope_positions

    model_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2, untie_embeddings=untie)
    tcfg = build_transformer_config(model_cfg, ParallelConfig(), TrainConfig(precision="fp32"))
    model = build_model(model_cfg, tcfg, vocab_size=300, seq_length=48, seed=3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (2, 48), generator=g)
    labels = torch.randint(0, 300, (2, 48), generator=g)
    cu = torch.tensor([[0, 10, 48], [0, 48, 48]], dtype=torch.int32)

    def run(processor):
        model.zero_grad()
        layout = DocumentLayout.from_cu_seqlens(cu, 48)
        packed = DocumentPackedSeqParams(qkv_format="sbhd", layout=layout,
                                         positions=rope_positions(layout, "continuous").t().contiguous())
        loss = model(tokens, None, None, labels=labels, packed_seq_params=packed, output_processor=processor)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full_loss, full_grads = run(None)
    block_loss, block_grads = run(BlockwiseLoss(block))
    assert full_loss.shape == block_loss.shape == (2, 48)
    torch.testing.assert_close(block_loss, full_loss, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(block_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
