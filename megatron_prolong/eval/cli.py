"""``eval_long.py SUBCOMMAND ...``: score, generate, recall, position-loss, helmet-command."""

from __future__ import annotations

import argparse
import sys

from megatron_prolong.inference import CheckpointError


def _model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--checkpoint", required=True, help="checkpoint folder, checkpoints/ root or run folder")
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--cp", type=int, default=1)
    s.add_argument("--dtype", choices=("fp32", "bf16"), help="compute dtype (default: the checkpoint's)")


def _decode_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--batch-size", type=int, default=8,
                   help="prompts of one length bucket decoded together (default 8; fewer where their caches "
                        "would not fit the GPU's free memory); each output equals its batch-of-one output")
    s.add_argument("--graphs", choices=("auto", "off"), default="auto",
                   help="auto (default): replay each decode step from a CUDA graph on a GPU at TP = CP = 1")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_long.py", description="Evaluate megatron-prolong checkpoints. "
                                "Launch with torchrun for TP/CP (--tp/--cp); other ranks split the lines.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="per-token log-probabilities of (packed) lines, document-masked",
                       description="Each input JSON line has input_ids and optional indices ((start, end) document "
                                   "boundaries); each output line adds token_logprobs (null at document starts).")
    _model_args(s)
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--chunk", type=int, default=2048, help="tokens per output-layer block (default 2048)")

    g = sub.add_parser("generate", help="greedy generation with a KV cache",
                       description="Each input JSON line has input_ids (optional indices: generation continues "
                                   "the last document) or prompt (tokenized with the checkpoint's tokenizer, "
                                   "its special tokens added: BOS for Llama-3 and for the byte tokenizer); each "
                                   "output line adds output_ids (greedy, ending "
                                   "at an EOS id), output_logprobs and text.")
    _model_args(g)
    g.add_argument("--input", required=True)
    g.add_argument("--output", required=True)
    g.add_argument("--max-new-tokens", type=int, required=True)
    g.add_argument("--max-length", type=int, help="longest prompt + output accepted (default: the checkpoint's "
                                                  "seq_length)")
    g.add_argument("--eos-ids", type=_ints, help="comma-separated stop ids (default: the tokenizer's EOS and "
                                                 "generation_config.json's eos_token_id)")
    _decode_args(g)

    r = sub.add_parser("recall", help="synthetic recall suite (JSON KV, RULER) scored as HELMET does",
                       description="Generates each task with the checkpoint's tokenizer at each length (each "
                                   "sample within one haystack step below it; lengths below a task's minimum are "
                                   "refused), decodes greedily and writes OUT/results.json (task x length x depth, "
                                   "scores in percent), OUT/samples.jsonl and OUT/recall_heatmap.png.")
    _model_args(r)
    r.add_argument("--tasks", help="comma-separated: json_kv, ruler_mk2, ruler_mk3, ruler_mv, ruler_vt (default: "
                                   "every one that works at the shortest length; ruler_mv with --haystack-file)")
    r.add_argument("--lengths", type=_ints, required=True, help="comma-separated target lengths in tokens")
    r.add_argument("--samples", type=int, default=50, help="samples per task and length (default 50)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--haystack-file", help="plain-text prose for ruler_mv's essay haystack (recorded in results)")
    r.add_argument("--max-length", type=int, help="longest length accepted (default: the checkpoint's seq_length)")
    r.add_argument("--out", required=True)
    _decode_args(r)

    pl = sub.add_parser("position-loss", help="mean loss by log-spaced position bucket on held-out documents",
                        description="DATA: jsonl (input_ids with optional indices, or text) or an MDS folder. "
                                    "Writes OUT/position_loss.json and OUT/position_loss.png.")
    _model_args(pl)
    pl.add_argument("--data", required=True)
    pl.add_argument("--out", required=True)
    pl.add_argument("--max-sequences", type=int, help="score at most this many sequences")

    h = sub.add_parser("helmet-command", help="check a Hugging Face export and print the HELMET commands",
                       description="Checks the export's rope_theta, max_position_embeddings, tokenizer and EOS ids, "
                                   "then prints HELMET's eval.py commands (run them in a HELMET checkout).")
    h.add_argument("--checkpoint", required=True, help="the Hugging Face export (convert_checkpoint.py mcore-to-hf)")
    h.add_argument("--length", type=int, default=131072, help="evaluated length (default 131072)")
    h.add_argument("--rope-theta", type=float, help="the trained RoPE base, to check the export against")
    h.add_argument("--output-dir", default="output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_prolong.eval.rows import EvalInputError

    try:
        if args.command == "score":
            from megatron_prolong.eval.score import score_file

            n = score_file(args.checkpoint, args.input, args.output, tp=args.tp, cp=args.cp, dtype=args.dtype,
                           chunk=args.chunk)
            print(f"[eval] scored {n} lines -> {args.output}", file=sys.stderr)
        elif args.command == "generate":
            from megatron_prolong.eval.generate import generate_file

            n = generate_file(args.checkpoint, args.input, args.output, max_new_tokens=args.max_new_tokens,
                              tp=args.tp, cp=args.cp, dtype=args.dtype, max_length=args.max_length,
                              eos=args.eos_ids, batch_size=args.batch_size, graphs=args.graphs)
            print(f"[eval] generated for {n} lines -> {args.output}", file=sys.stderr)
        elif args.command == "recall":
            from megatron_prolong.eval.recall import recall_main

            tasks = None if args.tasks is None else [t for t in args.tasks.split(",") if t]
            recall_main(args.checkpoint, tasks, args.lengths, args.samples,
                        args.out, seed=args.seed, haystack_file=args.haystack_file, tp=args.tp, cp=args.cp,
                        dtype=args.dtype, max_length=args.max_length, batch_size=args.batch_size,
                        graphs=args.graphs)
        elif args.command == "position-loss":
            from megatron_prolong.eval.position_loss import position_loss_main

            position_loss_main(args.checkpoint, args.data, args.out, tp=args.tp, cp=args.cp, dtype=args.dtype,
                               max_sequences=args.max_sequences)
        elif args.command == "helmet-command":
            from megatron_prolong.eval.helmet import check_export, helmet_commands

            info = check_export(args.checkpoint, args.length, args.rope_theta)
            print(f"# {args.checkpoint}: rope_theta {info['rope_theta']}, max_position_embeddings "
                  f"{info['max_position_embeddings']}, eos_token_id {info['eos_token_id']}", file=sys.stderr)
            print("\n".join(helmet_commands(args.checkpoint, args.length, args.output_dir)))
    except (CheckpointError, EvalInputError, FileNotFoundError) as err:
        print(f"eval_long.py: error: {err}", file=sys.stderr)
        return 1
    return 0
