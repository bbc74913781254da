"""The repository's docs stand alone: no tracked file cites the project's private background notes,
and every `data.root` example of a recipe preset points where that preset reads its data."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "megatron_prolong" / "conf"
# The released dataset folder each preset's data.root leads to (docs/recipe.md).
RELEASED = {"prolong_64k": "prolong-data-64K", "prolong_512k": "prolong-data-512K",
            "prolong_sft": "prolong-ultrachat-64K"}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]
    except (OSError, subprocess.CalledProcessError):  # an unpacked source tree: every file but build outputs
        skip = {".git", ".venv", "outputs", "build", "dist", "__pycache__"}
        return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


def test_no_file_cites_notes_outside_the_repository():
    names = ("RECIPE" + ".md", "DESIGN" + ".md")  # spelled apart so that this file does not cite them
    hits = []
    for f in tracked_files():
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{f.relative_to(REPO)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                 if any(name in line for name in names)]
    assert not hits, "cite docs/recipe.md (or docs/benchmarks.md) instead: " + ", ".join(hits)


def data_root_examples() -> list[tuple[str, str, str]]:
    """(where, preset, data.root) of every documented launch of a recipe preset."""
    out = []
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "slurm").glob("*.sh")),
              *sorted((CONF / "experiment").glob("*.yaml"))]:
        text = re.sub(r"\\\n\s*(#\s*)?", " ", f.read_text())  # join continued command lines
        for m in re.finditer(r"experiment=(prolong_\w+)[^\n]*?data\.root=(\S+)", text):
            out.append((f.relative_to(REPO).as_posix(), m.group(1), m.group(2)))
    return out


def test_examples_are_found():
    where = {w for w, _, _ in data_root_examples()}
    assert {"README.md", "docs/recipe.md", "docs/slurm.md", "slurm/sft.sh"} <= where
    assert {p for _, p, _ in data_root_examples()} == set(RELEASED)


@pytest.mark.parametrize("where,preset,root", data_root_examples())
def test_data_root_examples_agree_with_the_preset(where, preset, root):
    experiment = yaml.safe_load((CONF / "experiment" / f"{preset}.yaml").read_text())
    (data,) = [d["override /data"] for d in experiment["defaults"] if isinstance(d, dict) and "override /data" in d]
    mixture = yaml.safe_load((CONF / "data" / f"{data}.yaml").read_text())["mixture"]
    for domain in mixture:
        folder = Path(root) / domain["path"]
        assert folder.parts.count(RELEASED[preset]) == 1, (
            f"{where}: experiment={preset} data.root={root} makes the trainer read {folder}; data.root is the "
            f"folder that holds the domain folders (see megatron_prolong/conf/data/{data}.yaml)"
        )
