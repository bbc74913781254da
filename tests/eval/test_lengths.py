"""Every length a user asks for works, from each task's minimum up, with the byte tokenizer and the
real Llama-3 one: a sample is as long as it can be at or below its target, less than one haystack
step below it (HELMET's data come from RULER's generators, which fill the haystack up to the
budget). Below the minimum the request is refused, naming the task, the minimum and the nearest
lengths that work, before any model is loaded."""

from __future__ import annotations

import pytest
from eval_helpers import llama3_checkpoint, llama3_tokenizer, prose

from megatron_prolong.eval.rows import EvalInputError
from megatron_prolong.eval.samples import make_samples, minimum_length
from megatron_prolong.eval.tasks import TASKS, haystack_words, render
from megatron_prolong.tokenizer import ByteTokenizer, encode_prompt

SEED, NUM = 3, 2
TEXT = prose()
#: one haystack step in bytes where it is fixed: a JSON pair `"<uuid>": "<uuid>", `, a multi-key 3
#: needle line with its newline, variable tracking's noise line with the space that joins it
BYTE_STEPS = {"json_kv": 80, "ruler_mk3": 114, "ruler_vt": 92}


@pytest.fixture(scope="module", params=["byte", "llama3"])
def tokenizer(request):
    return ByteTokenizer() if request.param == "byte" else llama3_tokenizer()


def lengths_from(minimum: int, top: int = 8192) -> list[int]:
    """The minimum and the lengths just above it, every power of two up to ``top`` and a stride between."""
    powers = [2**k for k in range(6, 14) if minimum <= 2**k <= top]
    return sorted({minimum, minimum + 1, minimum + 2, *range(minimum, top + 1, 127), *powers, top})


@pytest.mark.parametrize("task", TASKS)
def test_every_length_from_the_minimum_up(task, tokenizer):
    encode = lambda text: encode_prompt(tokenizer, text)  # noqa: E731
    minimum = minimum_length(task, NUM, encode, SEED, TEXT)
    assert minimum <= 2048  # every task works at 2048 and up with either tokenizer (the byte one's ruler_vt: 1775)
    words = haystack_words(TEXT)
    for length in lengths_from(minimum):
        samples = make_samples(task, length, NUM, encode, SEED, TEXT)
        assert len(samples) == NUM
        for s in samples:
            total = len(s.input_ids) + s.max_new_tokens
            assert s.length == length and total <= length, (task, length, total)
            assert s.input_ids == encode(s.prompt)
            # Within one haystack step: one more unit would not fit.
            bigger, _, _ = render(task, SEED, s.index, s.depth, s.units + 1, words)
            assert len(encode(bigger)) + s.max_new_tokens > length, (task, length, s.units)
            if isinstance(tokenizer, ByteTokenizer) and task in BYTE_STEPS:
                assert length - total < BYTE_STEPS[task], (task, length, total)


@pytest.mark.parametrize("task", TASKS)
def test_below_the_minimum_is_refused_naming_it(task, tokenizer):
    encode = lambda text: encode_prompt(tokenizer, text)  # noqa: E731
    minimum = minimum_length(task, NUM, encode, SEED, TEXT)
    power = 1 << (minimum - 1).bit_length()
    with pytest.raises(EvalInputError) as err:
        make_samples(task, minimum - 1, NUM, encode, SEED, TEXT)
    assert str(err.value).startswith(f"{task}: {minimum - 1} tokens is below the task's minimum of {minimum} tokens")
    assert f"every length from {minimum} up works (the nearest: {minimum}, {power})" in str(err.value)


def test_the_issue_lengths_with_the_byte_tokenizer():
    """Failures seen before: json_kv at 2048 (one pair is 80 bytes, more than 2 % of it), multi-key 3
    at 1024, variable tracking below 4096 (its worked example is now RULER's smallest: 3-letter names,
    5 noise lines); and every task at the powers of two from 2048 to 8192."""
    encode = lambda text: encode_prompt(ByteTokenizer(), text)  # noqa: E731
    for task, length in [("json_kv", 2048), ("ruler_mk3", 1024), ("ruler_vt", 2304), ("ruler_vt", 3072)]:
        (s,) = make_samples(task, length, 1, encode, 0)
        assert len(s.input_ids) + s.max_new_tokens <= length
    for task in TASKS:
        for length in (2048, 4096, 8192):
            assert len(make_samples(task, length, 2, encode, 0, TEXT)) == 2


def test_prompts_start_with_bos():
    """The byte tokenizer's prompts start with its BOS, as its training documents do."""
    (s,) = make_samples("ruler_mk2", 1024, 1, lambda t: encode_prompt(ByteTokenizer(), t), 0)
    assert s.input_ids[0] == ByteTokenizer.bos_id and s.input_ids[1:] == list(s.prompt.encode())


def test_recall_refuses_short_lengths_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from megatron_prolong import inference
    from megatron_prolong.eval.cli import main

    ckpt = llama3_checkpoint(tmp_path, max_pos=4096)
    capsys.readouterr()  # the conversion's own output

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(inference, "load_model", no_model)
    tok = llama3_tokenizer()
    encode = lambda text: encode_prompt(tok, text)  # noqa: E731
    mins = {t: minimum_length(t, 1, encode, 0) for t in ("json_kv", "ruler_vt")}
    code = main(["recall", "--checkpoint", str(ckpt), "--tasks", "json_kv,ruler_vt", "--lengths", "300,4096",
                 "--samples", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and not (tmp_path / "out").exists()
    (err,) = [line for line in err.splitlines() if "error" in line]  # one line, after import warnings
    assert err.startswith("eval_long.py: error: ")
    for task, m in mins.items():
        assert f"{task}: 300 tokens is below the task's minimum of {m} tokens" in err, err
    assert "(the nearest: " in err


def test_default_tasks_are_those_that_work(tmp_path, monkeypatch, capsys):
    """``recall`` without --tasks runs every task that works at all the lengths and names the others
    with the reason (ruler_mv without an essay, a minimum above the shortest length); with none
    left it refuses, naming each task's minimum; both before any model is loaded."""
    from megatron_prolong import inference
    from megatron_prolong.eval import recall
    from megatron_prolong.eval.cli import main

    ckpt = llama3_checkpoint(tmp_path, max_pos=4096)
    capsys.readouterr()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    asked = {}

    def stop(tasks, lengths, *args):
        asked.update(tasks=list(tasks), lengths=list(lengths))
        raise EvalInputError("stopped before building the samples")

    monkeypatch.setattr(inference, "load_model", no_model)
    monkeypatch.setattr(recall, "build_samples", stop)
    tok = llama3_tokenizer()
    encode = lambda text: encode_prompt(tok, text)  # noqa: E731
    mins = {t: minimum_length(t, 1, encode, 0, TEXT) for t in TASKS}
    shortest = mins["ruler_vt"] - 1  # every task but variable tracking fits
    assert shortest >= max(m for t, m in mins.items() if t != "ruler_vt")
    args = ["recall", "--checkpoint", str(ckpt), "--samples", "1", "--out", str(tmp_path / "out")]
    assert main([*args, "--lengths", f"{shortest},4096"]) == 1
    assert asked == {"tasks": ["json_kv", "ruler_mk2", "ruler_mk3"], "lengths": [shortest, 4096]}
    out = capsys.readouterr().out
    assert ("[recall] tasks: json_kv, ruler_mk2, ruler_mk3; left out: ruler_mv (needs an essay haystack: "
            f"--haystack-file PROSE.txt (eval.haystack_file)); ruler_vt (needs {mins['ruler_vt']} tokens or more)"
            in out), out

    (tmp_path / "essay.txt").write_text(TEXT)
    assert main([*args, "--lengths", f"{mins['ruler_vt']},4096", "--haystack-file", str(tmp_path / "essay.txt")]) == 1
    assert asked["tasks"] == list(TASKS) and "left out" not in capsys.readouterr().out

    assert main([*args, "--lengths", "100"]) == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err.startswith("eval_long.py: error: no recall task works at 100 tokens with this tokenizer: ")
    for task in ("json_kv", "ruler_mk2", "ruler_mk3", "ruler_vt"):
        assert f"{task} needs {mins[task]} tokens or more" in err, err
    assert "give longer --lengths" in err
