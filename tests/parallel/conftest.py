"""The single-process run every parallel layout is compared with, trained once per test session."""

from __future__ import annotations

import pytest
from trainrun import parity_baseline


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return parity_baseline(tmp_path_factory)
