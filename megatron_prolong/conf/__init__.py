"""Packaged Hydra configs (importable so Hydra finds them from a wheel too)."""
