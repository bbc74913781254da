"""The package works when installed from its wheel: configs are packaged, not read from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_carries_configs_and_runs_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("megatron_prolong-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("megatron_prolong/conf/config.yaml", "megatron_prolong/conf/experiment/prolong_64k.yaml",
                 "megatron_prolong/conf/data/prolong_512k.yaml", "megatron_prolong/conf/model/llama3_8b.yaml"):
        assert path in names, path
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run(
        [sys.executable, "-c", "import megatron_prolong, sys; print(megatron_prolong.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().startswith(str(site)), proc.stdout + proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_prolong.train", "experiment=prolong_512k", "tokenizer.path=/models/x",
         "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "seq_length: 524288" in proc.stdout and "rope_base: 128000000.0" in proc.stdout
