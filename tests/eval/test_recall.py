"""Recall suite: HELMET's metrics on known outputs, the task generators (exact formats, determinism,
needle depths, with the real Llama-3 tokenizer) and an end-to-end run. Sample lengths at every
length: tests/eval/test_lengths.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import llama3_checkpoint, llama3_tokenizer, prose

from megatron_prolong.eval.metrics import normalize_answer, parse_output, qa_metrics, ruler_recall
from megatron_prolong.eval.recall import score_sample
from megatron_prolong.eval.rows import EvalInputError
from megatron_prolong.eval.samples import make_samples
from megatron_prolong.eval.tasks import DEPTHS, MAX_NEW_TOKENS, TASKS
from megatron_prolong.tokenizer import encode_prompt

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("text,expected", [
    ("The Quick, brown fox!", "quick brown fox"),  # articles, punctuation, case
    ("  an   apple a day  ", "apple day"),  # whitespace collapses; 'a'/'an' dropped as words only
    ("Theatre and another", "theatre and another"),  # no article inside words
    ("3b67907f-2fb4-4177", "3b67907f2fb44177"),  # UUID hyphens are punctuation
    ("a-b", "ab"),  # punctuation goes before the articles: "a-b" -> "ab", not "b"
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_substring_exact_match_and_parsing():
    # The raw output contains the value: substring match, but not exact match.
    m = qa_metrics("Corresponding value: 65e152ab-6cdb\n\nKey: other", ["65e152ab-6cdb"], "Corresponding value:")
    assert m == {"exact_match": 1.0, "substring_exact_match": 1.0}  # exact via the parsed first answer line
    assert parse_output("Corresponding value: abc\nmore", "Corresponding value:") == "abc"
    assert parse_output("corresponding value: Corresponding value: x", "Corresponding value:") == "x"
    m = qa_metrics("Corresponding value: the 65E152AB-6cdb.", ["65e152ab-6cdb"], "Corresponding value:")
    assert m["substring_exact_match"] == 1.0
    m = qa_metrics("Corresponding value: 65e152ab-6cdc", ["65e152ab-6cdb"], "Corresponding value:")
    assert m == {"exact_match": 0.0, "substring_exact_match": 0.0}
    assert qa_metrics("no answer here", ["x1", "here"], "Answer:")["substring_exact_match"] == 1.0  # best gold


def test_ruler_recall():
    assert ruler_recall("The special magic numbers are 1234567, 7654321.", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert ruler_recall("VAR abcde and VAR FGHIJ", ["ABCDE", "FGHIJ"]) == 1.0  # case-insensitive
    assert ruler_recall("12345", ["1234567"]) == 0.0


# ------------------------------------------------------------------------- generators
def test_depths_and_generation_budgets_are_helmets():
    # RULER: 40 depths, np.round(np.linspace(0, 100, 40)); HELMET's generation_max_length:
    # configs/recall.yaml 50 / 100 / 50 / 100 for ruler_niah_mk_2 / mk_3 / mv / json_kv, configs/ruler.yaml
    # 50 for ruler_vt.
    assert DEPTHS == [0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 33, 36, 38, 41, 44, 46, 49, 51, 54, 56, 59,
                      62, 64, 67, 69, 72, 74, 77, 79, 82, 85, 87, 90, 92, 95, 97, 100]
    assert MAX_NEW_TOKENS == {"json_kv": 100, "ruler_mk2": 50, "ruler_mk3": 100, "ruler_mv": 50, "ruler_vt": 50}


@pytest.fixture(scope="module")
def encode():
    tok = llama3_tokenizer()
    return lambda text: encode_prompt(tok, text)


@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_length_deterministic_and_placed(task, encode):
    text = prose()
    for length in (4096, 8192):
        a = make_samples(task, length, 3, encode, seed=5, haystack_text=text)
        b = make_samples(task, length, 3, encode, seed=5, haystack_text=text)
        c = make_samples(task, length, 3, encode, seed=6, haystack_text=text)
        assert [s.prompt for s in a] == [s.prompt for s in b]
        assert [s.prompt for s in a] != [s.prompt for s in c]
        for s in a:
            assert s.input_ids == encode(s.prompt) and len(s.input_ids) + s.max_new_tokens <= length
            assert s.input_ids[0] == 128000  # Llama-3's BOS, as HF's tokenizer adds it
            assert s.prompt.endswith("\n" + s.answer_prefix)
            assert all(ans in s.prompt for ans in s.answers)
            assert s.depth in DEPTHS
    # The queried needle sits at its depth (fraction of the haystack), within a few percent.
    for s in make_samples(task, 8192, 4, encode, seed=1, haystack_text=text):
        body = s.prompt
        where = body.find(s.answers[0]) if task != "ruler_vt" else body.rfind("VAR " + s.answers[0] + " =")
        span_start = body.find("\n") if task.startswith("ruler") else 0
        frac = 100 * (where - span_start) / len(body)
        assert abs(frac - s.depth) < 6, (task, s.depth, frac)


def test_formats_exactly_as_helmet(encode):
    kv = make_samples("json_kv", 4096, 1, encode, seed=0)[0]
    context, rest = kv.prompt.split("\n\nExtract the value corresponding to the specified key in the JSON object "
                                    "below.\n\n")
    assert isinstance(json.loads(context), dict) and len(json.loads(context)) > 20
    demos = rest.split("\n\n")
    assert len(demos) == 3 and all(d.startswith("Key: \"") and "\nCorresponding value: " in d for d in demos[:2])
    assert demos[2].startswith("Key: \"") and demos[2].endswith("\nCorresponding value:")
    assert json.loads(context)[json.loads(demos[2][5:].split("\n")[0])] == kv.answers[0]

    mk2 = make_samples("ruler_mk2", 4096, 1, encode, seed=0)[0]
    key = mk2.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    assert mk2.prompt.startswith("A special magic number is hidden within the following text. Make sure to memorize "
                                 "it. I will quiz you about the number afterwards.\n")
    assert f"One of the special magic numbers for {key} is: {mk2.answers[0]}." in mk2.prompt
    assert mk2.prompt.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?\n"
                               f"The special magic number for {key} mentioned in the provided text is")
    assert len(mk2.answers[0]) == 7 and mk2.prompt.count(f"for {key} is:") == 1

    mk3 = make_samples("ruler_mk3", 4096, 1, encode, seed=0)[0]
    key = mk3.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    head = ("A special magic uuid is hidden within the following text. Make sure to memorize it. I will quiz you "
            "about the uuid afterwards.\n")
    tail = (f"\nWhat is the special magic uuid for {key} mentioned in the provided text?\n"
            f"The special magic uuid for {key} mentioned in the provided text is")
    assert mk3.prompt.startswith(head) and mk3.prompt.endswith(tail)
    lines = mk3.prompt[len(head):-len(tail)].split("\n")
    uuid_re = "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert all(re.fullmatch(f"One of the special magic uuids for {uuid_re} is: {uuid_re}\\.", x) for x in lines)
    assert lines.count(f"One of the special magic uuids for {key} is: {mk3.answers[0]}.") == 1
    assert mk3.max_new_tokens == 100

    mv = make_samples("ruler_mv", 4096, 1, encode, seed=0, haystack_text=prose())[0]
    key = mv.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    head = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
            "you about the numbers afterwards.\n")
    tail = (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?\n"
            f"The special magic numbers for {key} mentioned in the provided text are")
    assert mv.prompt.startswith(head) and mv.prompt.endswith(tail) and len(set(mv.answers)) == 4
    essay = mv.prompt[len(head):-len(tail)]
    for value in mv.answers:
        assert essay.count(f"One of the special magic numbers for {key} is: {value}.") == 1
    assert essay.count("One of the special magic") == 4

    vt = make_samples("ruler_vt", 4096, 1, encode, seed=0)[0]
    value = vt.answer_prefix.split("the value ")[1].split(",")[0]
    assert re.fullmatch("[0-9]{5}", value)
    # HELMET's data.py (load_ruler, "vt"): the question and the answer prefix both read "assigned"
    # (RULER's constants.py spelled the prefix "assgined" until 2025; HELMET's text is the reference).
    assert vt.answer_prefix == ("Answer: According to the chain(s) of variable assignment in the text above, 5 "
                                f"variables are assigned the value {value}, they are:")
    assert "assgined" not in vt.prompt
    assert vt.prompt.endswith(f"\nQuestion: Find all variables that are assigned the value {value} in the text "
                              "above.\n" + vt.answer_prefix)
    task = vt.prompt.rsplit("Memorize and track the chain(s) of variable assignment hidden in the following "
                            "text.\n\n", 1)[1]
    names = vt.answers
    assert len(set(names)) == 5 and all(re.fullmatch("[A-Z]{5}", n) for n in names)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(4)]
    where = [task.index(c) for c in chain]
    assert where == sorted(where)  # the chain in order, in the noise
    assert task.count("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
                      "again.") > 10
    assert vt.prompt.count("Memorize and track") == 2  # one worked example first
    # The example as RULER's variable_tracking.py makes its ICL example: 3-letter names, its answer
    # after the prefix; it cannot be copied as the 5-letter answer.
    example = vt.prompt[:-len(task)].rsplit("Memorize and track", 1)[0]
    shot_names = example.split("they are: ")[1].split()
    assert len(set(shot_names)) == 5 and all(re.fullmatch("[A-Z]{3}", n) for n in shot_names), shot_names
    assert example.endswith(" ".join(shot_names) + "\n\n") and f"VAR {shot_names[0]} = " in example


def test_bad_requests_are_refused(encode):
    with pytest.raises(EvalInputError, match="--haystack-file"):
        make_samples("ruler_mv", 4096, 1, encode, seed=0)
    with pytest.raises(EvalInputError, match="words all fit in 8192 tokens; give a longer prose file"):
        make_samples("ruler_mv", 8192, 1, encode, seed=0, haystack_text=prose(500))
    with pytest.raises(EvalInputError, match="unknown task"):
        make_samples("niah_x", 4096, 1, encode, seed=0)
    with pytest.raises(EvalInputError, match="json_kv: 100 tokens is below the task's minimum"):
        make_samples("json_kv", 100, 1, encode, seed=0)


# ------------------------------------------------------------------------- end to end
def test_recall_tool_end_to_end(tmp_path):
    ckpt = llama3_checkpoint(tmp_path, max_pos=4096)
    (tmp_path / "essay.txt").write_text(prose())
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "tools/eval_long.py", "recall", "--checkpoint", str(ckpt), "--lengths", "2048,3072",
           "--samples", "1", "--haystack-file", str(tmp_path / "essay.txt"), "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["tasks"]) == set(TASKS) and results["scale"] == "percent (0-100)"
    assert f"wrote {tmp_path / 'out' / 'results.json'}" in res.stdout
    for cells in results["tasks"].values():
        assert set(cells) == {"2048", "3072"}
        for cell in cells.values():
            assert cell["n"] == 1 and 0 <= cell["score"] <= 100 and len(cell["by_depth"]) == 1
    assert results["haystack_file"]["path"] == str((tmp_path / "essay.txt").resolve())
    assert len(results["haystack_file"]["sha256"]) == 64
    png = tmp_path / "out" / "recall_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 2 and all(isinstance(r["text"], str) for r in rows)
    assert "ruler_vt" in res.stdout and "avg" in res.stdout  # the console table

    # A length beyond the model's is refused before any generation.
    bad = [*cmd[:5], "--lengths", "8192", *cmd[7:]]
    res = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 1 and "exceed the model's length 4096" in res.stderr


def test_scoring_uses_prefix_plus_generation(encode):
    """A perfect continuation scores 100, a wrong one 0, with each task's metric."""
    for task in TASKS:
        s = make_samples(task, 4096, 1, encode, seed=3, haystack_text=prose())[0]
        assert score_sample(s, " " + ", ".join(s.answers) + ".\n") == 100.0
        assert score_sample(s, " none") == 0.0
