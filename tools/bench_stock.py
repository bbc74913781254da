"""tools/bench.py's ``stock`` baseline: Megatron-Core's GPTModel with its Transformer Engine layer
spec, bf16 parameters trained by torch's fused AdamW, no DDP (needs Transformer Engine)."""

from __future__ import annotations

from dataclasses import replace

import torch


class StockPath:
    """Megatron-Core GPTModel + TE layer spec, bf16 parameters, torch fused AdamW, no DDP."""

    def __init__(self, cfg, topo):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        from megatron.core.transformer import TransformerConfig
        import torch.nn.functional as F

        from megatron_prolong.model.loss import BlockwiseLoss

        m = cfg.model
        self.cfg = cfg
        config = TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
            kv_channels=m.hidden_size // m.num_attention_heads, normalization="RMSNorm",
            layernorm_epsilon=m.norm_epsilon, activation_func=F.silu, gated_linear_unit=True,
            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=True,
            params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, bias_activation_fusion=True,
            apply_rope_fusion=True, gradient_accumulation_fusion=False, calculate_per_token_loss=True,
        )
        self.model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_with_transformer_engine_spec(),
                              vocab_size=m.vocab_size, max_sequence_length=cfg.data.seq_length,
                              position_embedding_type="rope", rotary_base=int(m.rope_base),
                              share_embeddings_and_output_weights=False).cuda()
        t = cfg.train
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                     eps=t.adam_eps, weight_decay=t.weight_decay, fused=True)
        self.loss = BlockwiseLoss(t.loss_block_size, cfg.kernels.cross_entropy)
        self.params_per_layer = sum(p.numel() for n, p in self.model.named_parameters() if ".layers.0." in n)
        self.loader = None

    def use_layout(self, name: str) -> None:
        from megatron_prolong.data.config import DomainConfig
        from megatron_prolong.data.loader import MixtureLoader

        data = replace(self.cfg.data, mixture=[DomainConfig(name=name, path=name, share=1.0)])
        self.loader = MixtureLoader(data, vocab_size=self.cfg.model.vocab_size, seed=0, dp_rank=0, dp_size=1,
                                    micro_batch_size=1, num_micro_batches=1)

    def step(self) -> None:
        from megatron_prolong.train.step import prepare_te_micro_batch

        mb = prepare_te_micro_batch(self.loader.next_step()[0], cp_size=1, cp_rank=0, device=torch.device("cuda"))
        self.opt.zero_grad(set_to_none=True)
        out = self.model(mb.tokens, None, None, labels=mb.labels, packed_seq_params=mb.packed,
                         output_processor=self.loss)
        loss = (out.float() * mb.loss_mask).sum() / mb.loss_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip, foreach=True)
        self.opt.step()
        loss.item()

    def close(self) -> None:
        del self.model, self.opt


def te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "no TE here"
        print(f"[bench] Transformer Engine not importable ({type(err).__name__}: {err}); "
              "skipping the paths that need it", flush=True)
        return False
    return True


