"""Both batch layouts carry exactly the loader's tokens, labels and loss mask."""

from __future__ import annotations

import torch

from megatron_prolong.train.step import _loss_func, prepare_micro_batch, prepare_te_micro_batch


def _batch():
    g = torch.Generator().manual_seed(0)
    s = 32
    tokens = torch.randint(0, 100, (2, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    cu = torch.tensor([[0, 5, 6, 19, 32], [0, 32, 32, 32, 32]], dtype=torch.int32)
    mask = torch.ones(2, s)
    mask[:, -1] = 0
    mask[0, [4, 5, 18]] = 0  # labels that start a document
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "cu_seqlens": cu,
            "domain": torch.tensor([1, 0])}


def _union(parts, field):
    return torch.cat([getattr(p, field).reshape(-1) for p in parts])


def test_te_thd_layout_keeps_every_token_and_masks_padding():
    mb = _batch()
    for cp in (1, 2, 4):
        parts = [prepare_te_micro_batch(mb, cp_size=cp, cp_rank=r, device=torch.device("cpu")) for r in range(cp)]
        tokens, mask, ids = _union(parts, "tokens"), _union(parts, "loss_mask"), _union(parts, "sample_ids")
        real = mask > 0
        # Every trained token appears once, on the right row, with its label; padding is never trained.
        assert real.sum() == mb["loss_mask"].sum()
        assert sorted(tokens[real].tolist()) == sorted(mb["tokens"][mb["loss_mask"] > 0].tolist())
        assert (torch.bincount(ids[real], minlength=2) == mb["loss_mask"].sum(1).long()).all()
        cu_padded = parts[0].packed.cu_seqlens_q_padded
        assert (torch.diff(cu_padded) % (2 * cp if cp > 1 else 1) == 0).all()
        assert parts[0].packed.qkv_format == "thd" and tokens.numel() == int(cu_padded[-1])


def test_loss_is_summed_per_sample_in_both_layouts():
    mb = _batch()
    per_token = torch.arange(64, dtype=torch.float32).reshape(2, 32) / 10
    expected = (per_token * mb["loss_mask"]).sum(1)
    plugin = prepare_micro_batch(mb, rope_mode="continuous", cp_size=1, cp_rank=0, device=torch.device("cpu"))
    loss, count, out = _loss_func(plugin, per_token)
    torch.testing.assert_close(out["stats"].loss_sum, expected)
    assert int(count) == int(mb["loss_mask"].sum())
    # In the THD layout, a "loss" equal to each token's id must sum, over the CP ranks, to the
    # row sums of the masked token ids.
    total = torch.zeros(2)
    for rank in range(2):
        te = prepare_te_micro_batch(mb, cp_size=2, cp_rank=rank, device=torch.device("cpu"))
        total += _loss_func(te, te.tokens.float())[2]["stats"].loss_sum
    torch.testing.assert_close(total, (mb["tokens"].float() * mb["loss_mask"]).sum(1))
