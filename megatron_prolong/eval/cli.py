"""``eval_long.py SUBCOMMAND ...``; ``score`` is the first subcommand."""

from __future__ import annotations

import argparse
import sys

from megatron_prolong.convert.mapping import ConversionError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_long.py", description="Evaluate megatron-prolong checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="per-token log-probabilities of (packed) lines, document-masked",
                       description="Each input JSON line has input_ids and optional indices ((start, end) document "
                                   "boundaries); each output line adds token_logprobs (null at document starts). "
                                   "Launch with torchrun for TP/CP (--tp/--cp); other ranks split the lines.")
    s.add_argument("--checkpoint", required=True, help="checkpoint folder, checkpoints/ root or run folder")
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--cp", type=int, default=1)
    s.add_argument("--dtype", choices=("fp32", "bf16"), help="compute dtype (default: the checkpoint's)")
    s.add_argument("--chunk", type=int, default=2048, help="tokens per output-layer block (default 2048)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_prolong.eval.score import ScoreInputError, score_file

    try:
        n = score_file(args.checkpoint, args.input, args.output, tp=args.tp, cp=args.cp, dtype=args.dtype,
                       chunk=args.chunk)
    except (ConversionError, ScoreInputError, FileNotFoundError) as err:
        print(f"eval_long.py: error: {err}", file=sys.stderr)
        return 1
    print(f"[eval] scored {n} lines -> {args.output}", file=sys.stderr)
    return 0
