"""Every recall prompt is HELMET's template, filled: the strings below are copied verbatim from
princeton-nlp/HELMET ``data.py`` (``load_json_kv`` and ``load_ruler``; unchanged from commit 06526f1
"fix niah mv, mq prompt" to 13344b7, the last one to touch the file), and HELMET's prompt is
``user_template + "\\n" + system_template`` without a chat template. Each generated prompt must
match the filled template in full (every placeholder a wildcard, a repeated placeholder the same
text), so a changed word, a missing newline or RULER's "assgined" fails here."""

from __future__ import annotations

import re

import pytest
from eval_helpers import llama3_tokenizer, prose

from megatron_prolong.eval.samples import make_samples
from megatron_prolong.eval.tasks import TASKS
from megatron_prolong.tokenizer import ByteTokenizer, encode_prompt

# HELMET data.py, load_json_kv (prompt from lost-in-the-middle's kv_retrieval.prompt)
KV_USER = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n"
           "{demos}Key: {question}")
KV_SYSTEM = "Corresponding value:"
KV_DEMO = "Key: {key}\nCorresponding value:{value}"  # value is " " + value; demos joined by "\n\n", then "\n\n"
# HELMET data.py, load_ruler: "niah_mv" / "niah_mq", then "niah", then "vt"
MV_USER = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
           "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
           "{type_needle_v} for {query} mentioned in the provided text?")
MV_SYSTEM = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_USER = ("A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. I will "
             "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat is the special magic {type_needle_v} "
             "for {query} mentioned in the provided text?")
NIAH_SYSTEM = "The special magic {type_needle_v} for {query} mentioned in the provided text is"
VT_USER = ("{example}Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
           "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
VT_SYSTEM = ("Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are:")

TEMPLATES = {"json_kv": (KV_USER, KV_SYSTEM), "ruler_mk2": (NIAH_USER, NIAH_SYSTEM),
             "ruler_mk3": (NIAH_USER, NIAH_SYSTEM), "ruler_mv": (MV_USER, MV_SYSTEM), "ruler_vt": (VT_USER, VT_SYSTEM)}


MULTILINE = ("context", "demos", "example")


def template_regex(template: str) -> re.Pattern:
    """``template`` with each ``{name}`` a named group (its repeats back-references), the rest literal.
    The multi-line fields take as much as they can (the worked example of variable tracking holds
    the same sentences as the task after it); the others stay on one line."""
    out, seen = [], set()
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        out.append(re.escape(literal))
        if name:
            out.append(f"(?P={name})" if name in seen else
                       f"(?P<{name}>.*)" if name in MULTILINE else f"(?P<{name}>[^\\n]*)")
            seen.add(name)
    return re.compile("".join(out), re.DOTALL)


def test_template_regex_is_strict():
    rx = template_regex(NIAH_SYSTEM)
    assert rx.fullmatch("The special magic number for a-b mentioned in the provided text is")
    assert not rx.fullmatch("The special magic number for a-b mentioned in the provided text are")
    assert template_regex("{q} and {q}").fullmatch("x and x") and not template_regex("{q} and {q}").fullmatch("x and y")


@pytest.fixture(scope="module", params=["byte", "llama3"])
def encode(request):
    tok = ByteTokenizer() if request.param == "byte" else llama3_tokenizer()
    return lambda text: encode_prompt(tok, text)


@pytest.mark.parametrize("task", TASKS)
def test_prompt_is_helmets_template_filled(task, encode):
    user, system = TEMPLATES[task]
    whole = template_regex(user + "\n" + system)
    for s in make_samples(task, 4096, 3, encode, seed=11, haystack_text=prose()):
        m = whole.fullmatch(s.prompt)
        assert m, (task, s.prompt[:300], s.prompt[-300:])
        fields = m.groupdict()
        # The answer prefix scored with the generation is HELMET's system template, filled the same way.
        assert s.answer_prefix == system.format(**{k: v for k, v in fields.items() if "{" + k + "}" in system})
        if task == "json_kv":
            demos = fields["demos"]
            assert demos.endswith("\n\n")
            shots = demos[:-2].split("\n\n")
            assert len(shots) == 2  # configs/recall.yaml: shots: 2
            for shot in shots:
                d = template_regex(KV_DEMO).fullmatch(shot)
                assert d and d["value"].startswith(" ") and d["key"].startswith('"'), shot
            assert fields["question"].startswith('"') and fields["question"].endswith('"')
        elif task == "ruler_vt":
            assert fields["num_v"] == "5" and re.fullmatch("[0-9]{5}", fields["query"])
            # load_ruler appends "\n\n" to a non-empty example
            assert fields["example"].endswith("\n\n") and "assigned the value" in fields["example"]
        else:
            assert fields["type_needle_v"] == {"ruler_mk2": "number", "ruler_mk3": "uuid",
                                               "ruler_mv": "numbers"}[task]
        assert "assgined" not in s.prompt
