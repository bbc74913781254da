"""Evaluation of checkpoints: greedy generation, the HELMET-format recall suite, position-wise loss,
``score`` (per-token log-probabilities of packed lines), in-training evaluation (``eval.every``)
and the HELMET commands for an export."""
