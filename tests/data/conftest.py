"""Fixtures for the data tests (helpers live in data_helpers.py)."""

from __future__ import annotations

import pytest

from data_helpers import write_mds


@pytest.fixture
def mds(tmp_path):
    def make(name, samples, **kw):
        return write_mds(tmp_path / name, samples, **kw)

    return make
