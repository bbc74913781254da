"""Evaluation of checkpoints: ``score`` (per-token log-probabilities of packed lines) for now."""
