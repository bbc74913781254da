"""The README's demo block (train the demo, evaluate it, export it), run as printed once per test
session and shared: its first command's run is also the demo that tests/train/test_demo.py checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from trainrun import REPO, run_once, shared_root

MARK = "On the demo (byte tokenizer"  # the README paragraph before the example
DEMO_DIR = Path("outputs/demo")  # where the block's first command trains, relative to where it runs


def readme_demo_block() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index(MARK):].split("```bash\n", 1)[1].split("```", 1)[0]


def readme_demo_commands() -> list[str]:
    """The block's commands, continued lines joined, comment lines left out. Run one by one, so that
    the training's output can be told from the tools'; no command may rely on shell state another
    set (a `cd`, a variable), which would fail, not pass, when run alone."""
    lines = re.sub(r"\\\n\s*", " ", readme_demo_block()).splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def run_readme_command(root: Path, command: str) -> subprocess.CompletedProcess:
    """One README command, with bash in ``root`` (which sees the repository's tools/), ``python`` the
    test's."""
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "-e", "-c", command], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1500)


def readme_demo(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """(scratch folder, each command's result) after running the block's commands in order in a
    scratch folder, up to the first that fails. Whoever uses it must not change the folder."""

    def make(folder: Path) -> dict:
        root = folder / "readme"
        root.mkdir()
        (root / "tools").symlink_to(REPO / "tools")
        done = []
        for command in readme_demo_commands():
            res = run_readme_command(root, command)
            done.append({"args": res.args, "returncode": res.returncode, "stdout": res.stdout, "stderr": res.stderr})
            if res.returncode:
                break
        return {"root": str(root), "done": done}

    out = run_once(shared_root(tmp_path_factory), "readme-demo", make)
    return Path(out["root"]), [subprocess.CompletedProcess(d["args"], d["returncode"], d["stdout"], d["stderr"])
                               for d in out["done"]]
