"""The README's evaluation example on the demo, run as printed (in a scratch folder that sees the
repository's tools/, so outputs/demo is the demo its first command trains; once per session,
readme_demo.py, shared with tests/train/test_demo.py), and ``generate`` on that checkpoint:
``prompt`` lines get the byte tokenizer's BOS, as its help says."""

from __future__ import annotations

import json
import re

import pytest
from readme_demo import readme_demo, readme_demo_block, readme_demo_commands

from megatron_prolong.eval.tasks import MAX_NEW_TOKENS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(scratch folder, the commands' output) after running the README's demo block."""
    root, done = readme_demo(tmp_path_factory)
    last = done[-1]
    assert last.returncode == 0 and len(done) == len(readme_demo_commands()), (
        f"{last.args[-1]} failed ({last.returncode}):\n{(last.stdout + last.stderr)[-5000:]}")
    return root, "".join(res.stdout for res in done)


def test_readme_demo_example_runs_as_printed(demo):
    root, stdout = demo
    commands = re.sub(r"\\\n\s*", " ", readme_demo_block())
    assert "recall --checkpoint outputs/demo" in commands and "--lengths 1024,2048" in commands
    results = json.loads((root / "outputs/demo/recall/results.json").read_text())
    assert results["scale"] == "percent (0-100)"
    # No --tasks: the tasks that work at 1024 byte tokens; variable tracking (1775) and multi-value
    # (no essay) are named as left out, in the console and in results.json.
    assert set(results["tasks"]) == {"json_kv", "ruler_mk2", "ruler_mk3"}
    assert set(results["left_out"]) == {"ruler_mv", "ruler_vt"}
    assert "left out: ruler_mv (needs an essay haystack" in stdout and "ruler_vt (needs 1775 tokens" in stdout
    for cells in results["tasks"].values():
        assert set(cells) == {"1024", "2048"} and all(0 <= c["score"] <= 100 for c in cells.values())
    rows = [json.loads(x) for x in (root / "outputs/demo/recall/samples.jsonl").read_text().splitlines()]
    # Every sample at most its length, within one haystack step: in bytes a JSON pair, the longest
    # multi-key 2 needle line (6-letter adjective, 8-letter noun), a multi-key 3 line.
    steps = {"json_kv": 80, "ruler_mk2": 66, "ruler_mk3": 114}
    for r in rows:
        assert r["length"] - steps[r["task"]] < r["prompt_tokens"] + MAX_NEW_TOKENS[r["task"]] <= r["length"], r
    # Both tools say where they wrote.
    for path in ("outputs/demo/recall/results.json", "outputs/demo/recall/recall_heatmap.png",
                 "outputs/demo/position_loss/position_loss.json", "outputs/demo/position_loss/position_loss.png"):
        assert path in stdout and (root / path).is_file(), path
    # The export tokenizes and generates from a string prompt; HELMET's commands are printed for it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "outputs/demo-hf")
    prompt = tok("The river", return_tensors="pt")
    assert prompt["input_ids"][0].tolist() == [256, *b"The river"]
    out = AutoModelForCausalLM.from_pretrained(root / "outputs/demo-hf").generate(**prompt, max_new_tokens=8,
                                                                                   do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).startswith("The river") and out.shape[1] > 10
    assert f"--model_name_or_path {root / 'outputs/demo-hf'}" in stdout and "configs/recall.yaml" in stdout


def test_generate_prompt_lines_get_the_byte_tokenizers_bos(demo, tmp_path):
    from megatron_prolong.eval.generate import generate_file
    from megatron_prolong.tokenizer import ByteTokenizer

    root, _ = demo
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "The river"}) + "\n")
    generate_file(root / "outputs/demo", tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_new_tokens=4)
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["input_ids"] == [ByteTokenizer.bos_id, *b"The river"]
    assert len(row["output_ids"]) <= 4 and isinstance(row["text"], str)
