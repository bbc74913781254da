"""``eval_long.py helmet-command``: check a Hugging Face export for HELMET and print the commands.

HELMET (princeton-nlp/HELMET) and its data are not shipped; its ``eval.py`` reads a Hugging Face
folder. An export that silently lost the trained RoPE base, a too-small
``max_position_embeddings`` or the EOS ids would be evaluated wrongly, so those are checked first.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from megatron_prolong.eval.rows import EvalInputError

#: HELMET's categories and their config files (configs/<name>.yaml in the HELMET repository)
CATEGORIES = ("recall", "rag", "rerank", "cite", "longqa", "summ", "icl")


def check_export(folder: str | Path, length: int, rope_theta: float | None = None) -> dict:
    """The export's config.json, after checking what HELMET relies on; errors name the fix."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise EvalInputError(f"{folder} has no config.json: give the Hugging Face export "
                             "(tools/convert_checkpoint.py mcore-to-hf --input RUN --output HF)")
    cfg = json.loads(cfg_file.read_text())
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    if rope_theta is not None and (theta is None or abs(float(theta) - rope_theta) > 1e-6 * rope_theta):
        raise EvalInputError(f"{cfg_file}: rope_theta={theta} but the model was trained with {rope_theta:g}; "
                             "re-export it (mcore-to-hf writes the trained value)")
    if int(cfg.get("max_position_embeddings", 0)) < length:
        raise EvalInputError(f"{cfg_file}: max_position_embeddings={cfg.get('max_position_embeddings')} is below the "
                             f"evaluated length {length}; re-export with --seq-length {length}")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise EvalInputError(f"{folder} has no tokenizer; re-export with --tokenizer TOKENIZER_DIR")
    gen_file = folder / "generation_config.json"
    eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.is_file() else None
    if eos is None:
        raise EvalInputError(f"{folder} has no eos_token_id in generation_config.json: generation would not stop; "
                             "copy the base model's generation_config.json into the export")
    tok_eos = _tokenizer_eos(folder)
    eos_list = eos if isinstance(eos, list) else [eos]
    if tok_eos is not None and tok_eos not in eos_list:
        raise EvalInputError(f"{gen_file}: eos_token_id {eos} does not include the tokenizer's EOS id {tok_eos}")
    return {"rope_theta": theta, "max_position_embeddings": cfg["max_position_embeddings"], "eos_token_id": eos}


def _tokenizer_eos(folder: Path) -> int | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).eos_token_id


def helmet_commands(folder: str | Path, length: int, output_dir: str = "output") -> list[str]:
    model = shlex.quote(str(Path(folder).resolve()))
    return [f"python eval.py --config configs/{c}.yaml --model_name_or_path {model} --use_chat_template False "
            f"--input_max_length {length} --output_dir {shlex.quote(output_dir)}/{c}" for c in CATEGORIES]
