"""``convert_checkpoint.py MODE --input IN --output OUT [options]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_prolong.convert.mapping import ConversionError

MODES = ("hf-to-mcore", "mcore-to-hf", "nemo-to-mcore", "mcore-to-nemo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert Hugging Face Llama / NeMo checkpoints to and from megatron-prolong's Megatron "
                    "distributed checkpoints. Output is written to a temporary folder and renamed at the end.",
    )
    p.add_argument("mode", choices=MODES)
    p.add_argument("--input", required=True, help="source checkpoint (folder, or a .nemo file)")
    p.add_argument("--output", required=True, help="new folder to create")
    p.add_argument("--rope-base", type=float, help="hf-to-mcore: RoPE base to train with (e.g. 8e6)")
    p.add_argument("--seq-length", type=int, help="maximum length recorded in the output (e.g. 65536)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="weights dtype of the output (default: the input's)")
    p.add_argument("--tokenizer", help="tokenizer folder to include (default: the input's own)")
    p.add_argument("--vocab-size", type=int, help="nemo-to-mcore: real vocabulary size (default: config/tokenizer)")
    p.add_argument("--max-shard-size", default="5GB", help="mcore-to-hf: safetensors shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once conversion succeeded)")
    return p


def run(args: argparse.Namespace) -> Path:
    if args.mode == "hf-to-mcore":
        from megatron_prolong.convert.hf import hf_to_mcore

        return hf_to_mcore(args.input, args.output, rope_base=args.rope_base, seq_length=args.seq_length,
                           dtype=args.dtype, tokenizer=args.tokenizer, overwrite=args.overwrite)
    if args.mode == "mcore-to-hf":
        from megatron_prolong.convert.hf import mcore_to_hf

        return mcore_to_hf(args.input, args.output, dtype=args.dtype, seq_length=args.seq_length,
                           max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite)
    if args.mode == "nemo-to-mcore":
        from megatron_prolong.convert import nemo

        src = Path(args.input)
        fn = nemo.nemo1_to_mcore if src.is_file() else nemo.nemo2_to_mcore
        return fn(src, args.output, dtype=args.dtype, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                  seq_length=args.seq_length, overwrite=args.overwrite)
    from megatron_prolong.convert import nemo

    return nemo.mcore_to_nemo2(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, modes in (("rope_base", ("hf-to-mcore",)), ("vocab_size", ("nemo-to-mcore",))):
        if getattr(args, flag) is not None and args.mode not in modes:
            print(f"convert_checkpoint.py: --{flag.replace('_', '-')} applies to {', '.join(modes)} only",
                  file=sys.stderr)
            return 2
    try:
        run(args)
    except ConversionError as err:
        print(f"convert_checkpoint.py: error: {err}", file=sys.stderr)
        return 1
    return 0
