"""The data presets state the paper's shares (docs/recipe.md) and ProLong's released folder names exactly."""

import os

import pytest
from omegaconf import OmegaConf

from megatron_prolong.data.config import DataConfig

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "megatron_prolong", "conf", "data")

SHORT = {"fineweb-edu": 0.10, "fineweb-2023-50": 0.10, "stackexchange": 0.04, "dolmawiki": 0.04,
         "tuluv2": 0.03, "arxiv": 0.03, "openwebmath": 0.03, "textbooks": 0.03}
EXPECTED = {
    "prolong_64k": (65536, False, {"thestackv1_concat_by_repo-65536": 0.30, "book-65536": 0.30, **SHORT}),
    "prolong_512k": (524288, False, {"thestackv1_concat_by_repo-524288": 0.15, "thestackv1_concat_by_repo-65536": 0.15,
                                     "book-524288": 0.05, "book-65536": 0.25, **SHORT}),
    "prolong_sft": (65536, True, {"prolong-ultrachat-64K": 1.0}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset(name):
    seq, sft, shares = EXPECTED[name]
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(os.path.join(CONF, name + ".yaml")))
    assert cfg.seq_length == seq and cfg.sft is sft and cfg.synthetic is False
    assert cfg.root.startswith("datasets")  # the one key to set (ProLong: a local datasets/ folder)
    got = {d.path: d.share for d in cfg.mixture}
    assert got == shares
    assert abs(sum(got.values()) - 1.0) < 1e-9
    assert all(d.format == "mds" and d.name == d.path for d in cfg.mixture)
    # Long/short split of stage 1 and 2: 60% long, 40% short (paper; docs/recipe.md).
    if not sft:
        assert abs(sum(SHORT.values()) - 0.40) < 1e-9


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_composes_with_hydra(name):
    pytest.importorskip("megatron_prolong.config")
    from hydra import compose, initialize_config_module

    from megatron_prolong.config import register_configs

    register_configs()
    with initialize_config_module(config_module="megatron_prolong.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[f"data={name}", "data.root=/some/where"])
    assert cfg.data.root == "/some/where"
    assert {d.path: d.share for d in cfg.data.mixture} == EXPECTED[name][2]
