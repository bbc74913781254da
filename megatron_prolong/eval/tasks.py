"""The synthetic recall tasks, generated locally with the checkpoint's tokenizer, in the formats
HELMET runs them (princeton-nlp/HELMET ``data.py``: ``load_json_kv``, ``load_ruler``; the RULER
tasks as NVIDIA RULER's ``scripts/data/synthetic/niah.py`` and ``variable_tracking.py`` build them).
Where RULER's text and HELMET's differ, HELMET's ``data.py`` templates are followed: the ProLong
paper's numbers come from them.

- ``json_kv``: a JSON object of random UUID4 keys and values; 2 demonstrations from the object;
  the model names the value of one key (``substring_exact_match``).
- ``ruler_mk2``: RULER multi-key 2: word keys -> 7-digit numbers; the haystack is distractor
  needles of the same form, one a line.
- ``ruler_mk3``: RULER multi-key 3: UUID keys -> UUID values, distractor-needle haystack.
- ``ruler_mv``: RULER multi-value: 4 numbers for one word key hidden in an essay haystack (RULER
  downloads Paul Graham's essays; here the prose comes from a user file, recorded in the results).
- ``ruler_vt``: RULER variable tracking: one chain of 5 variables (4 hops) in a noise haystack,
  after a short worked example (``ruler_recall``).

Needles go at one of 40 uniform depths (0-100 %), at sentence (line, key) boundaries. A prompt is
a pure function of (seed, task, sample index, depth, haystack size): :func:`render`. Its random
content does not depend on the target length, so a task's smallest sample (``MIN_UNITS``) is the
same at every length; :mod:`megatron_prolong.eval.samples` picks the haystack size per length.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Callable

TASKS = ("json_kv", "ruler_mk2", "ruler_mk3", "ruler_mv", "ruler_vt")
#: generation budget per task, HELMET's ``generation_max_length``: configs/recall.yaml (ruler_niah_mk_2 50,
#: ruler_niah_mk_3 100, ruler_niah_mv 50, json_kv 100) and configs/ruler.yaml (ruler_vt 50)
MAX_NEW_TOKENS = {"json_kv": 100, "ruler_mk2": 50, "ruler_mk3": 100, "ruler_mv": 50, "ruler_vt": 50}
#: RULER's needle depths: 40 points from 0 to 100 %
DEPTHS = [round(100 * i / 39) for i in range(40)]
#: the smallest haystack of each task, in its units (UNITS): json_kv needs the queried pair and 2
#: others for the demonstrations; variable tracking's 5 chain lines go between noise lines
MIN_UNITS = {"json_kv": 3, "ruler_mk2": 1, "ruler_mk3": 1, "ruler_mv": 1, "ruler_vt": 5}
#: one haystack step of each task: a sample lands less than one of these below its target length
UNITS = {"json_kv": "key-value pair", "ruler_mk2": "distractor needle", "ruler_mk3": "distractor needle",
         "ruler_mv": "essay word", "ruler_vt": "noise line"}

_NEEDLE = "One of the special magic {type} for {key} is: {value}."
_NIAH = ("A special magic {type} is hidden within the following text. Make sure to memorize it. I will quiz you "
         "about the {type} afterwards.\n{context}\nWhat is the special magic {type} for {query} mentioned in the "
         "provided text?")
_NIAH_PREFIX = "The special magic {type} for {query} mentioned in the provided text is"
_NIAH_MV = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. I will quiz "
            "you about the {type} afterwards.\n{context}\nWhat are all the special magic {type} for {query} "
            "mentioned in the provided text?")
_NIAH_MV_PREFIX = "The special magic {type} for {query} mentioned in the provided text are"
_KV = "{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n{demos}Key: {key}"
_KV_PREFIX = "Corresponding value:"
_VT = ("{example}Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
       "Question: Find all variables that are assigned the value {query} in the text above.")
# HELMET's load_ruler spells "assigned"; RULER's constants.py read "assgined" until 2025.
_VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {num} variables are "
              "assigned the value {query}, they are:")
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"

# RULER draws word keys as adjective-noun pairs (wonderwords' lists); these 100 x 100 common words
# give 10,000 keys, and the queried key is never reused by a distractor.
_ADJECTIVES = """able acid angry basic bitter blue brave bright broad calm cheap clean clear cold cool crazy cruel
curly damp dark dear deep dirty dizzy dry dull eager early easy empty equal faint fair fancy fast fat few fierce
fine firm flat fresh full funny gentle giant glad gold good grand great green grey happy hard heavy high hollow
hot huge humble icy jolly keen kind large late lazy light little livid long loud lucky mad mellow mild modern
narrow neat new nice noisy odd old pale plain polite poor proud quick quiet rapid rare raw red rich right rough
round royal sad safe""".split()
_NOUNS = """anchor apple arrow badge baker banana basket beach bell berry bird blanket boat bottle bridge brush
bucket button cabin camera candle canyon carpet castle cattle chair cherry circle cloud coast coffee comet copper
cotton crayon crown curtain desert diamond dragon drum eagle engine falcon feather fence field flag flower forest
fountain garden giraffe glacier guitar hammer harbor helmet honey island jacket jungle kettle kitten ladder lantern
lemon library lizard magnet maple marble meadow mirror monkey mountain needle ocean orange otter palace parrot
pebble pencil pepper piano pillow planet pocket pumpkin rabbit radio river rocket saddle sailor""".split()


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))


def _word(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _at(units: int, depth: int) -> int:
    return round(units * depth / 100)


def _json_kv(rng: random.Random, units: int, depth: int, haystack: list[str] | None):
    # Keys quoted as in the JSON object: the prompt HELMET's load_json_kv takes from lost-in-the-middle
    # (kv_retrieval.prompt) asks for `Key: "<uuid>"`.
    units = max(units, 3)
    pairs = [(_uuid(rng), _uuid(rng)) for _ in range(units)]
    target = min(_at(units, depth), units - 1)
    others = [i for i in range(units) if i != target]
    demos = "".join(f"Key: {json.dumps(pairs[i][0])}\n{_KV_PREFIX} {pairs[i][1]}\n\n" for i in rng.sample(others, 2))
    context = json.dumps(dict(pairs))
    key, value = pairs[target]
    prompt = _KV.format(context=context, demos=demos, key=json.dumps(key)) + "\n" + _KV_PREFIX
    return prompt, [value], _KV_PREFIX


def _multikey(key_fn: Callable, value_fn: Callable, type_: str):
    def build(rng: random.Random, units: int, depth: int, haystack: list[str] | None):
        key, value = key_fn(rng), value_fn(rng)
        lines = []
        while len(lines) < units:
            k = key_fn(rng)
            if k != key:
                lines.append(_NEEDLE.format(type=type_ + "s", key=k, value=value_fn(rng)))
        lines.insert(_at(units, depth), _NEEDLE.format(type=type_ + "s", key=key, value=value))
        prefix = _NIAH_PREFIX.format(type=type_, query=key)
        return _NIAH.format(type=type_, context="\n".join(lines), query=key) + "\n" + prefix, [value], prefix
    return build


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _multivalue(rng: random.Random, units: int, depth: int, haystack: list[str] | None):
    key = _word(rng)
    values = [_number(rng) for _ in range(4)]
    needles = [_NEEDLE.format(type="numbers", key=key, value=v) for v in values]
    sents = _sentences(" ".join(haystack[:units]))
    depths = [depth] + rng.sample([d for d in DEPTHS if d != depth], 3)
    cuts = sorted(zip((_at(len(sents), d) for d in depths), range(4)))
    out, last = [], 0
    for pos, i in cuts:
        out.extend(sents[last:pos])
        out.append(needles[i])
        last = pos
    out.extend(sents[last:])
    prefix = _NIAH_MV_PREFIX.format(type="numbers", query=key)
    return _NIAH_MV.format(type="numbers", context=" ".join(out), query=key) + "\n" + prefix, values, prefix


def _vt_text(rng: random.Random, units: int, depth: int, example: str,
             name_len: int = 5) -> tuple[str, list[str], str]:
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=name_len))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    first = min(_at(units, depth), units - 4)
    positions = [first] + sorted(rng.sample(range(first + 1, units + 1), 4))
    sentences = [_NOISE] * units
    for j, pos in enumerate(positions):
        sentences.insert(pos + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    prefix = _VT_PREFIX.format(num=5, query=value)
    return _VT.format(example=example, context=context, query=value) + "\n" + prefix, names, value


def _variable_tracking(rng: random.Random, units: int, depth: int, haystack: list[str] | None):
    # The worked example as RULER's variable_tracking.py builds its ICL example: 3-letter names (the
    # answer's are 5, so the example's cannot be copied as the answer). Its haystack is the task's
    # smallest (MIN_UNITS), so that the byte tokenizer's ruler_vt fits 2048 tokens (about 1,800).
    shot, shot_answer, _ = _vt_text(rng, MIN_UNITS["ruler_vt"], rng.choice(DEPTHS), "", name_len=3)
    prompt, names, value = _vt_text(rng, units, depth, shot + " " + " ".join(shot_answer) + "\n\n")
    return prompt, names, _VT_PREFIX.format(num=5, query=value)


_BUILDERS = {
    "json_kv": _json_kv,
    "ruler_mk2": _multikey(_word, _number, "number"),
    "ruler_mk3": _multikey(_uuid, _uuid, "uuid"),
    "ruler_mv": _multivalue,
    "ruler_vt": _variable_tracking,
}


def haystack_words(text: str | None) -> list[str] | None:
    """ruler_mv's essay as words (RULER's ``re.sub(r'\\s+', " ", essay).split(" ")``)."""
    return re.sub(r"\s+", " ", text).strip().split(" ") if text else None


def render(task: str, seed: int, index: int, depth: int, units: int,
           words: list[str] | None = None) -> tuple[str, list[str], str]:
    """(prompt, answers, answer prefix) of sample ``index`` of ``task``: its needle at ``depth``
    percent of a haystack of ``units`` (at least ``MIN_UNITS[task]``; ruler_mv: at most
    ``len(words)``)."""
    if units < MIN_UNITS[task] or (task == "ruler_mv" and (not words or units > len(words))):
        raise ValueError(f"{task}: a haystack of {units} units is out of range")
    return _BUILDERS[task](random.Random(f"{seed}:{task}:{index}"), units, depth, words)
