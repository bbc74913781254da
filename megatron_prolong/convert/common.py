"""Shared pieces of the converters: atomic output folders, tokenizer files, progress."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from megatron_prolong.convert.mapping import ConversionError
from megatron_prolong.tokenizer import tokenizer_files


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; it becomes ``out`` only if the block succeeds, with
    the modes the user's umask gives (the temporary folder is private until then).

    On any error the temporary folder is removed and ``out`` is left as it was (absent).
    """
    out = Path(out).absolute()
    if out.exists():
        if not overwrite:
            raise ConversionError(f"{out} already exists; choose a new output path (or pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share_as_umask_allows(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def share_as_umask_allows(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` / ``open`` would have under
    the user's umask (0755 / 0644 with umask 022): ``mkdtemp`` made it owner-only, and colleagues on
    a shared cluster must be able to read an export."""
    umask = os.umask(0o077)  # reading the umask means setting it; put back at once
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def copy_tokenizer(src: str | Path | None, dst: Path) -> bool:
    """Copy the tokenizer files of ``src`` into ``dst``; False (and a warning) when there are none."""
    files = tokenizer_files(src) if src else []
    if not files:
        warn(f"no tokenizer files found in {src}; pass --tokenizer DIR to include one")
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    return True


def warn(msg: str) -> None:
    print(f"[convert] warning: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    print(f"[convert] {msg}", file=sys.stderr, flush=True)


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True,
                disable=os.environ.get("PROLONG_CONVERT_QUIET") == "1")
