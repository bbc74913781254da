"""helmet-command: a real export passes the checks and gives HELMET's commands; each broken property
is refused with the fix."""

from __future__ import annotations

import json

import pytest
from convert_helpers import make_hf_llama

from megatron_prolong.convert.hf import hf_to_mcore, mcore_to_hf
from megatron_prolong.eval.cli import main


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("helmet")
    make_hf_llama(root / "hf", layers=1, rope_theta=5e5)
    hf_to_mcore(root / "hf", root / "mc", rope_base=8e6, seq_length=8192)
    mcore_to_hf(root / "mc", root / "out")
    return root / "out"


def _run(capsys, *args):
    code = main(["helmet-command", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_commands_for_a_good_export(export, capsys):
    code, out, _ = _run(capsys, "--checkpoint", str(export), "--length", "8192", "--rope-theta", "8e6")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 7
    assert lines[0].startswith(f"python eval.py --config configs/recall.yaml --model_name_or_path {export.resolve()} "
                               "--use_chat_template False")
    assert any("configs/rag.yaml" in x for x in lines) and all("--input_max_length 8192" in x for x in lines)


def test_broken_exports_are_refused(export, capsys, tmp_path):
    code, _, err = _run(capsys, "--checkpoint", str(export), "--length", "16384")
    assert code == 1 and "max_position_embeddings=8192 is below the evaluated length 16384" in err
    code, _, err = _run(capsys, "--checkpoint", str(export), "--length", "8192", "--rope-theta", "5e5")
    assert code == 1 and "trained with 500000" in err
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    gen = json.loads((bad / "generation_config.json").read_text())
    gen.pop("eos_token_id")
    (bad / "generation_config.json").write_text(json.dumps(gen))
    code, _, err = _run(capsys, "--checkpoint", str(bad), "--length", "8192")
    assert code == 1 and "no eos_token_id" in err
