"""Loss-mask rules, cu_seqlens, and each bad-input case (clear error naming file and sample)."""

import json
import os

import numpy as np
import pytest
import torch

from data_helpers import packed_samples
from megatron_prolong.data.config import DataConfig, DomainConfig
from megatron_prolong.data.loader import MixtureLoader, build_row
from megatron_prolong.data.metrics import DomainTracker
from megatron_prolong.data.sources import DataError, Sample

S = 16


def row(ids, indices, mask=None, sft=False, s=S):
    sample = Sample(np.asarray(ids, dtype=np.uint32), np.asarray(indices, dtype=np.int64).reshape(-1, 2),
                    None if mask is None else np.asarray(mask, dtype=np.uint8), "test")
    return build_row(sample, seq_length=s, sft=sft, pad_id=0)


def test_loss_mask_first_token_of_each_document_and_last_position():
    tokens, labels, loss, cu = row(np.arange(1, 17), [(0, 5), (5, 12), (12, 16)])
    assert cu.tolist() == [0, 5, 12, 16]
    assert labels.tolist() == list(range(2, 17)) + [0]
    expected = np.ones(S)
    expected[[4, 11, 15]] = 0  # labels 6 and 13 start documents; the last position has no label
    assert loss.tolist() == expected.tolist()


def test_loss_mask_single_document_and_missing_indices():
    _, _, loss, cu = row(np.arange(S), [(0, S)])
    assert cu.tolist() == [0, S] and loss.sum() == S - 1
    _, _, loss2, cu2 = row(np.arange(S), np.zeros((0, 2)))
    assert cu2.tolist() == [0, S] and loss2.tolist() == loss.tolist()


def test_loss_mask_gap_not_in_any_document():
    # Tokens 6..7 belong to no listed document (ProLong's collator drops them): no loss on
    # predicting them; they form their own attention segment.
    _, _, loss, cu = row(np.arange(S), [(0, 6), (8, 16)])
    assert cu.tolist() == [0, 6, 8, 16]
    expected = np.ones(S)
    expected[[5, 6, 7, 15]] = 0
    assert loss.tolist() == expected.tolist()


def test_padding_gets_no_loss():
    tokens, labels, loss, cu = row(np.arange(1, 11), [(0, 4), (4, 10)])
    assert tokens.tolist() == list(range(1, 11)) + [0] * 6
    assert cu.tolist() == [0, 4, 10, 16]
    expected = np.zeros(S)
    expected[[0, 1, 2, 4, 5, 6, 7, 8]] = 1  # 3 predicts the doc start 5; 9 predicts padding
    assert loss.tolist() == expected.tolist()


def test_sft_mask_applies_to_labels():
    mask = [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    _, _, loss, _ = row(np.arange(S), [(0, 8), (8, 16)], mask=mask, sft=True)
    # loss at i iff label i+1 has mask 1 and is not a document start
    expected = [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert loss.tolist() == expected
    _, _, loss_cpt, _ = row(np.arange(S), [(0, 8), (8, 16)], mask=mask, sft=False)
    assert loss_cpt.sum() == S - 2  # CPT ignores a mask column


def test_cu_seqlens_padded_per_micro_batch(mds, tmp_path):
    mds("x", [
        {"input_ids": np.arange(S, dtype=np.uint32), "indices": np.array([[0, S]], dtype=np.uint32)},
        {"input_ids": np.arange(S, dtype=np.uint32), "indices": np.array([[0, 3], [3, 9], [9, 16]], dtype=np.uint32)},
    ])
    cfg = DataConfig(root=str(tmp_path), seq_length=S, synthetic=False,
                     mixture=[DomainConfig(name="x", path="x", share=1.0)], balance_micro_batches=True)
    ld = MixtureLoader(cfg, vocab_size=258, seed=0, dp_rank=0, dp_size=1, micro_batch_size=2, num_micro_batches=1)
    (mb,) = ld.next_step()
    cu = sorted(mb["cu_seqlens"].tolist())
    assert cu == [[0, 3, 9, 16], [0, 16, 16, 16]]
    # Balanced: the single 16-token document (cost 256) comes before 9+36+49 = 94.
    assert mb["cu_seqlens"][0].tolist() == [0, 16, 16, 16]


# ---- bad input ------------------------------------------------------------------------------

def cfg_for(root, paths, shares=None, **kw):
    shares = shares or [1.0] * len(paths)
    mixture = [DomainConfig(name=f"d{i}", path=p, share=s) for i, (p, s) in enumerate(zip(paths, shares))]
    return DataConfig(root=str(root), seq_length=S, synthetic=False, mixture=mixture, **kw)


def loader(cfg, vocab=258):
    return MixtureLoader(cfg, vocab_size=vocab, seed=0, dp_rank=0, dp_size=1, micro_batch_size=1, num_micro_batches=2)


def good(n=6):
    return packed_samples(n, S, doc_range=(2, 8))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"domain 'd0': folder .*nowhere does not exist"):
        loader(cfg_for(tmp_path, ["nowhere"]))


def test_folder_without_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no index.json"):
        loader(cfg_for(tmp_path, ["empty"]))


@pytest.mark.parametrize("shares,msg", [((1.0, -0.5), r"data.mixture\[1\].share=-0.5"),
                                        ((0.0, 0.0), "sum to 0"),
                                        ((float("nan"), 1.0), r"data.mixture\[0\].share")])
def test_bad_shares(mds, tmp_path, shares, msg):
    mds("a", good())
    mds("b", good())
    with pytest.raises(ValueError, match=msg):
        loader(cfg_for(tmp_path, ["a", "b"], shares=list(shares)))


def test_bad_mixture_keys(mds, tmp_path):
    mds("a", good())
    cfg = cfg_for(tmp_path, ["a"])
    cfg.mixture[0].format = "parquet"
    with pytest.raises(ValueError, match=r"data.mixture\[0\].format='parquet'"):
        loader(cfg)
    cfg = cfg_for(tmp_path, ["a", "a"])
    cfg.mixture[1].name = "d0"
    with pytest.raises(ValueError, match="appears twice"):
        loader(cfg)


def test_token_id_outside_vocab(mds, tmp_path):
    samples = good()
    samples[0]["input_ids"][7] = 300
    path = mds("a", samples)
    with pytest.raises(DataError, match=r"shard\.00000\.mds: sample 0 .*token id 300 at position 7 .*vocab_size=258"):
        loader(cfg_for(tmp_path, ["a"]))
    assert os.path.isdir(path)


def test_indices_pair_outside_sequence(mds, tmp_path):
    samples = good()
    samples[-1]["indices"] = np.array([[0, 10], [10, 20]], dtype=np.uint32)
    mds("a", samples)
    with pytest.raises(DataError, match=r"shard\.00000\.mds: sample 5 .*indices pair #1 \(10, 20\) lies outside the sequence of 16"):
        loader(cfg_for(tmp_path, ["a"]))


def test_indices_overlapping(mds, tmp_path):
    samples = good()
    samples[0]["indices"] = np.array([[0, 10], [8, 16]], dtype=np.uint32)
    mds("a", samples)
    with pytest.raises(DataError, match=r"sample 0 .*overlaps"):
        loader(cfg_for(tmp_path, ["a"]))


def test_wrong_length_sequence(mds, tmp_path):
    samples = good()
    samples[0]["input_ids"] = samples[0]["input_ids"][:12]
    samples[0]["indices"] = np.array([[0, 12]], dtype=np.uint32)
    mds("a", samples)
    with pytest.raises(DataError, match=r"shard\.00000\.mds: sample 0 .*12 tokens but data.seq_length=16"):
        loader(cfg_for(tmp_path, ["a"]))
    # ... unless padding is asked for
    ld = loader(cfg_for(tmp_path, ["a"], pad_short_sequences=True))
    assert len(ld.sources[0]) == 6


def test_bad_sample_in_the_middle_found_by_full_scan_or_when_read(mds, tmp_path):
    samples = good(6)
    samples[3]["input_ids"][0] = 999
    mds("a", samples)
    with pytest.raises(DataError, match=r"shard\.00000\.mds: sample 3 .*token id 999"):
        loader(cfg_for(tmp_path, ["a"], validate_all=True))
    ld = loader(cfg_for(tmp_path, ["a"]))  # the cheap check only reads first/last samples
    with pytest.raises(DataError, match=r"shard\.00000\.mds: sample 3 .*token id 999"):
        for _ in range(6):
            ld.next_step()


def test_truncated_shard(mds, tmp_path):
    path = mds("a", good())
    shard = os.path.join(path, "shard.00000.mds")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(DataError, match=r"shard\.00000\.mds: shard has \d+ bytes but its index says"):
        loader(cfg_for(tmp_path, ["a"]))


def test_undecodable_shard(mds, tmp_path):
    path = mds("a", good())
    shard = os.path.join(path, "shard.00000.mds")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:  # garble everything after the offset table, keep the size
        f.seek(4 * 8)
        f.write(bytes([0xFF]) * (size - 32))
    with pytest.raises(DataError, match=r"shard\.00000\.mds: sample 0 "):
        loader(cfg_for(tmp_path, ["a"]))


def test_missing_shard_file_and_bad_index(mds, tmp_path):
    path = mds("a", good())
    os.remove(os.path.join(path, "shard.00000.mds"))
    with pytest.raises(DataError, match=r"shard\.00000\.mds: shard file is missing"):
        loader(cfg_for(tmp_path, ["a"]))
    path = mds("b", good())
    with open(os.path.join(path, "index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match=r"b/index.json: unreadable MDS index"):
        loader(cfg_for(tmp_path, ["b"]))


def test_sft_requires_mask(mds, tmp_path):
    mds("a", good())
    with pytest.raises(DataError, match=r"sample 0 .*no `mask` column, but data.sft=true"):
        loader(cfg_for(tmp_path, ["a"], sft=True))


def test_nested_release_layout(mds, tmp_path):
    # ProLong's releases: <domain>/procNN-64/{index.json, shard.*.mds}
    mds("dom/proc00-64", packed_samples(3, S, seed=1))
    mds("dom/proc01-64", packed_samples(4, S, seed=2))
    ld = loader(cfg_for(tmp_path, ["dom"]))
    assert len(ld.sources[0]) == 7
    assert "proc01-64/shard.00000.mds: sample 1" in ld.sources[0].get(4).where


def test_unresolved_root():
    with pytest.raises(ValueError, match=r"data.root='\$\{run.dir\}/data' is not resolved"):
        loader(DataConfig())


# ---- metrics --------------------------------------------------------------------------------

def test_domain_tracker():
    t = DomainTracker(["long", "short"])
    t.update(torch.tensor([0, 1, 1]), 16, torch.tensor([3.0, 4.0, 2.0]), torch.tensor([1.0, 2.0, 2.0]))
    d = t.as_dict()
    assert d == {"domain/long/samples": 1, "domain/long/tokens": 16, "domain/long/loss": 3.0,
                 "domain/short/samples": 2, "domain/short/tokens": 32, "domain/short/loss": 1.5}
    t.update(torch.tensor([1]), torch.tensor([10]), torch.tensor([5.0]), torch.tensor([5.0]))
    d = t.as_dict()
    assert "domain/long/loss" not in d and d["domain/short/loss"] == 1.0
    assert d["domain/short/samples"] == 3 and d["domain/short/tokens"] == 42
    t2 = DomainTracker(["long", "short"])
    t2.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert t2.as_dict() == {k: v for k, v in d.items() if not k.endswith("loss")}
