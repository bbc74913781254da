"""Shared fixtures."""

from __future__ import annotations

import pytest

from trainrun import TrainingRun, train


@pytest.fixture
def run_training(tmp_path):
    counter = iter(range(1000))

    def _run(*overrides: str, nproc: int = 1, check: bool = True) -> TrainingRun:
        return train(tmp_path / f"run{next(counter)}", *overrides, nproc=nproc, check=check)

    return _run
