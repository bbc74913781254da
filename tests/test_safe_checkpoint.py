"""A distributed checkpoint crafted to run code when unpickled is refused, by the trainer, the
converters and the scorer, before PyTorch unpickles it; real checkpoints still load (the
converter, NeMo and resume tests load theirs through the same check)."""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import make_hf_llama

from megatron_prolong.convert.hf import hf_to_mcore
from megatron_prolong.convert.mapping import ConversionError
from megatron_prolong.safe_checkpoint import UnsafeCheckpointError, read_metadata, verify


class Payload:
    """Unpickling this writes ``marker``: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safe")
    make_hf_llama(root / "hf", layers=1, tokenizer=False)
    return hf_to_mcore(root / "hf", root / "mc")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _refused_everywhere(ckpt: Path, marker: Path) -> None:
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.convert import cli
    from megatron_prolong.inference import load_model
    from megatron_prolong.train.checkpoint import load_checkpoint

    with pytest.raises(UnsafeCheckpointError, match=r"would call builtins\.exec when unpickled"):
        load_checkpoint(ckpt, model=None)  # the trainer: refused before the model is touched
    with pytest.raises(ConversionError, match=r"builtins\.exec.*nothing in it was run"):
        load_model(ckpt, ParallelConfig())
    assert cli.main(["mcore-to-hf", "--input", str(ckpt), "--output", str(ckpt.parent / "out")]) == 1
    assert not (ckpt.parent / "out").exists()
    assert not marker.exists(), "the checkpoint's code ran"


def test_crafted_metadata_is_refused_and_runs_nothing(tmp_path, converted):
    from megatron.core import dist_checkpointing

    verify(converted)  # the real one passes
    ckpt = _copy(converted, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    md = read_metadata(ckpt)
    md.planner_data = Payload(marker)  # otherwise valid metadata, one object inside it runs code
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    _refused_everywhere(ckpt, marker)

    # Megatron-Core's own reader runs it: the file is a real attack, not one the check merely dislikes.
    dist_checkpointing.load_tensors_metadata(str(ckpt))
    assert marker.read_text() == "ran"


def test_crafted_common_state_item_is_refused_and_runs_nothing(tmp_path, converted):
    """Non-tensor items in the .distcp files are loaded by PyTorch with torch.load(weights_only=False)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt = _copy(converted, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    md = read_metadata(ckpt)
    (fqn,) = [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)
              and k.startswith("common_state")]
    (index,) = [i for i in md.storage_data if i.fqn == fqn]
    info = md.storage_data[index]
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    data_file = ckpt / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(buf.getvalue())
    info.offset, info.length = offset, len(buf.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    verify_msg = r"__0_0\.distcp\[common_state.*would call builtins\.exec"
    with pytest.raises(UnsafeCheckpointError, match=verify_msg):
        verify(ckpt)
    _refused_everywhere(ckpt, marker)

    with contextlib.suppress(TypeError):  # what the payload returns is no state dict, but it ran
        dist_checkpointing.load_common_state_dict(str(ckpt))  # PyTorch's planner unpickles it
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("name", [".metadata", "__0_0.metadata"])  # the second: a per-rank metadata file
def test_unreadable_metadata_is_a_clear_error(tmp_path, converted, name):
    ckpt = _copy(converted, tmp_path / "ckpt")
    (ckpt / name).write_bytes(b"not a pickle")
    with pytest.raises(UnsafeCheckpointError, match=rf"{name} is not a readable checkpoint metadata file"):
        verify(ckpt)
