import numpy as np
import torch

from megatron_prolong.data.config import DataConfig
from megatron_prolong.data.loader import MixtureLoader


def test_synthetic_demo_batches(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "data"), seq_length=256, synthetic_sequences=32)
    loader = MixtureLoader(cfg, vocab_size=258, seed=0, dp_rank=0, dp_size=1,
                           micro_batch_size=2, num_micro_batches=3)
    assert loader.domain_names == ["long", "short"]
    assert (tmp_path / "data" / "long" / "index.json").is_file()
    step = loader.next_step()
    assert len(step) == 3
    for mb in step:
        assert mb["tokens"].dtype == torch.int64 and mb["tokens"].shape == (2, 256)
        assert mb["labels"].dtype == torch.int64 and mb["labels"].shape == (2, 256)
        assert torch.equal(mb["labels"][:, :-1], mb["tokens"][:, 1:])
        assert mb["loss_mask"].dtype == torch.float32 and mb["loss_mask"].shape == (2, 256)
        assert (mb["loss_mask"][:, -1] == 0).all()
        cu = mb["cu_seqlens"]
        assert cu.dtype == torch.int32 and (cu[:, 0] == 0).all() and (cu[:, -1] == 256).all()
        assert (cu[:, 1:] >= cu[:, :-1]).all()
        assert mb["domain"].dtype == torch.int64 and mb["domain"].shape == (2,)
        assert int(mb["tokens"].max()) < 258


def test_synthetic_corpus_is_deterministic(tmp_path):
    from megatron_prolong.data.synthetic import write_synthetic_corpus
    from megatron_prolong.data.sources import MDSSource

    write_synthetic_corpus(str(tmp_path / "a"), 128, num_sequences=8, seed=3)
    write_synthetic_corpus(str(tmp_path / "b"), 128, num_sequences=8, seed=3)
    for dom in ("long", "short"):
        a, b = MDSSource(dom, str(tmp_path / "a" / dom)), MDSSource(dom, str(tmp_path / "b" / dom))
        assert len(a) == len(b) == 8
        for i in range(8):
            sa, sb = a.get(i), b.get(i)
            assert np.array_equal(sa.input_ids, sb.input_ids) and sa.input_ids.shape == (128,)
            assert sa.input_ids.dtype == np.uint32
            assert np.array_equal(sa.indices, sb.indices)
            if dom == "long":
                assert sa.indices.tolist() == [[0, 128]]
            else:
                assert sa.indices[0, 0] == 0 and sa.indices[-1, 1] == 128 and len(sa.indices) >= 2


def test_synthetic_corpus_for_another_length_fails_clearly(tmp_path):
    import pytest

    root = str(tmp_path / "data")
    kw = dict(vocab_size=258, seed=0, dp_rank=0, dp_size=1, micro_batch_size=1, num_micro_batches=1)
    MixtureLoader(DataConfig(root=root, seq_length=64, synthetic_sequences=4), **kw)
    with pytest.raises(ValueError, match="prepared for data.seq_length=64 .*, but data.seq_length=128"):
        MixtureLoader(DataConfig(root=root, seq_length=128, synthetic_sequences=4), **kw)


def test_synthetic_long_domain_is_learnable_by_copying(tmp_path):
    """The long domain repeats a passage: most tokens are predictable from far back."""
    from megatron_prolong.data.sources import MDSSource
    from megatron_prolong.data.synthetic import write_synthetic_corpus

    write_synthetic_corpus(str(tmp_path), 1024, num_sequences=4)
    ids = MDSSource("long", str(tmp_path / "long")).get(0).input_ids
    assert ids[0] == 256 and ids[1:].max() < 256
    period = next(p for p in range(8, 400) if np.array_equal(ids[1 : 1 + p], ids[1 + p : 1 + 2 * p]))
    assert np.array_equal(ids[1 + period :], ids[1 : len(ids) - period])


def test_loader_accepts_a_hydra_dictconfig(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(DataConfig(root=str(tmp_path / "d"), seq_length=64, synthetic_sequences=8))
    cfg = OmegaConf.merge(cfg, OmegaConf.create({"mixture": [{"name": "long", "path": "long", "share": 1}]}))
    ld = MixtureLoader(cfg, vocab_size=258, seed=0, dp_rank=0, dp_size=1, micro_batch_size=2, num_micro_batches=1)
    (mb,) = ld.next_step()
    assert mb["domain"].tolist() == [0, 0] and ld.domain_names == ["long"]
