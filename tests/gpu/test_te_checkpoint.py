"""GPU with Transformer Engine: one checkpoint format for the plugin path and the TE path.

1. In one process: a plugin-path model saved the way ``hf-to-mcore`` writes (model only) loads
   into a TE-path model through the trainer's loader, and the two give the same logits on a
   packed batch (bf16: the kernels differ, so to bf16 accuracy; the norms are set to random
   values first so a norm that is not carried over shows). The TE model saved again loads into a
   new plugin model with every tensor bitwise equal to the original. The TE model's checkpoint
   keys are the plugin model's, and its per-layer names are the table's TE column.
2. Through the trainer: a plugin run checkpointed at step 2 resumes with the TE path (model and
   optimizer) to step 4, that one resumes with the plugin path to step 6, and the losses follow an
   uninterrupted plugin run within the TE-vs-plugin tolerance of tests/gpu/test_te_parity.py.
3. Across Adam implementations: a run whose child process cannot import TE (torch's AdamW) and
   one that can (TE's FusedAdam, which Megatron picks wherever TE imports) resume each other's
   checkpoints (megatron_prolong/train/adam_steps.py).
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace

import pytest
import torch
from trainrun import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"),
]

VOCAB, SEQ = 384, 256


def _batch():
    from megatron_prolong.data.loader import collate

    g = torch.Generator().manual_seed(0)
    rows = []
    for cuts in ([0, 40, 41, 200, SEQ], [0, SEQ]):
        tokens = torch.randint(0, VOCAB, (SEQ,), generator=g).numpy()
        labels = torch.randint(0, VOCAB, (SEQ,), generator=g).numpy()
        rows.append((tokens, labels, torch.ones(SEQ).numpy(), torch.tensor(cuts).numpy()))
    return collate(rows, [0, 0], SEQ)


def _logits(gpt, backend: str, mb) -> torch.Tensor:
    """[tokens, vocab] in the loader's row-major token order."""
    from megatron_prolong.te.thd import te_thd_packing
    from megatron_prolong.train.step import prepare_micro_batch, prepare_te_micro_batch

    dev = torch.device("cuda")
    with torch.no_grad():
        if backend == "te":
            m = prepare_te_micro_batch(mb, cp_size=1, cp_rank=0, device=dev)
            out = gpt(m.tokens, None, None, packed_seq_params=m.packed)[0]
            return te_thd_packing(list(mb["cu_seqlens"]), 1).unpack(out, dim=0).float()
        m = prepare_micro_batch(mb, rope_mode="continuous", cp_size=1, cp_rank=0, device=dev)
        out = gpt(m.tokens, None, None, packed_seq_params=m.packed)
        return out.reshape(-1, out.shape[-1]).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_plugin_checkpoint_loads_into_te_and_back(tmp_path):
    from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_prolong.convert.mcore import save_model, write_meta
    from megatron_prolong.inference import SHARDING_META, megatron_session
    from megatron_prolong.model.builder import build_model, build_transformer_config
    from megatron_prolong.te.checkpoint import LAYER_TENSORS, SHARED_EXTRA_STATE, is_te_only_extra_state
    from megatron_prolong.train.checkpoint import load_checkpoint

    base = ModelConfig(num_layers=2, untie_embeddings=True)

    def keys(gpt) -> set[str]:
        return {v.key for v in gpt.sharded_state_dict(metadata=SHARDING_META).values()}

    with megatron_session():
        def build(backend: str, init: bool, seed: int = 1):
            m = replace(base, attention_backend=backend)
            tc = build_transformer_config(m, ParallelConfig(), TrainConfig(precision="bf16"))
            return build_model(m, tc, VOCAB, SEQ, seed=seed, init=init).cuda().eval()

        plugin = build("plugin", init=True)
        with torch.no_grad():
            for p in plugin.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        save_model(plugin, tmp_path / "a")
        write_meta(tmp_path / "a", base, VOCAB, SEQ, None, {"test": "plugin"})

        te = build("te", init=False)
        assert keys(te) == keys(plugin)
        te_names = {n.split(".", 3)[3] for n in te.state_dict() if n.startswith("decoder.layers.0.")}
        extra = {n for n in te_names if n.endswith("._extra_state")}
        assert te_names - extra == {row[1] for row in LAYER_TENSORS}
        shared = {f"{m}._extra_state" for m in SHARED_EXTRA_STATE}
        assert shared <= extra
        assert all(is_te_only_extra_state(f"decoder.layers.0.{n}") for n in extra - shared)

        load_checkpoint(tmp_path / "a", te)
        mb = _batch()
        ref = _logits(plugin, "plugin", mb)
        got = _logits(te, "te", mb)
        fresh = _logits(build("plugin", init=True, seed=2), "plugin", mb)
        print(f"TE vs plugin logits: rel {_rel(got, ref):.2e} (another init: {_rel(fresh, ref):.2e})")
        assert _rel(got, ref) < 2e-2
        assert _rel(fresh, ref) > 0.5

        save_model(te, tmp_path / "b")
        write_meta(tmp_path / "b", base, VOCAB, SEQ, None, {"test": "te"})
        back = build("plugin", init=False)
        load_checkpoint(tmp_path / "b", back)
        for (name, a), (_, b) in zip(plugin.state_dict().items(), back.state_dict().items()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
        assert torch.equal(_logits(back, "plugin", mb), ref)


RUN = ("train.precision=bf16", "data.seq_length=1024", "train.global_batch_size=8", "train.micro_batch_size=2",
       "checkpoint.save_interval=2", "log.tensorboard=false")


def test_trainer_resumes_across_paths(tmp_path):
    reference = train(tmp_path / "ref", *RUN, "train.steps=6", "checkpoint.save_interval=0",
                      "model.attention_backend=plugin").losses
    train(tmp_path / "a", *RUN, "train.steps=2", "model.attention_backend=plugin")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    to_te = train(tmp_path / "b", *RUN, "train.steps=4", "model.attention_backend=te")
    assert "resumed from" in to_te.output and "attention backend te" in to_te.output
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    back = train(tmp_path / "c", *RUN, "train.steps=6", "model.attention_backend=plugin")
    assert "resumed from" in back.output and "attention backend plugin" in back.output
    losses = to_te.losses[-2:] + back.losses[-2:]
    rel = [abs(a - b) / b for a, b in zip(losses, reference[2:])]
    print("steps 3-6 after switching paths, relative loss difference:", " ".join(f"{r:.2e}" for r in rel))
    assert len(rel) == 4 and max(rel) < 5e-3, rel


def _pythonpath_without_te() -> dict[str, str]:
    """PYTHONPATH for a child that cannot import TE (where TE came in through PYTHONPATH, as
    tools/gpu/install_te.sh installs it): Megatron then builds torch's AdamW, not TE's FusedAdam."""
    import os
    from pathlib import Path

    import transformer_engine

    root = str(Path(transformer_engine.__file__).resolve().parent.parent)
    entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    if not any(str(Path(e).resolve()) == root for e in entries):
        pytest.skip(f"Transformer Engine is installed in {root}, not through PYTHONPATH: a child cannot be kept from it")
    return {"PYTHONPATH": os.pathsep.join(e for e in entries if str(Path(e).resolve()) != root)}


def test_resume_moves_between_torch_adamw_and_te_fused_adam(tmp_path):
    """The optimizer state of torch's AdamW (per-parameter step tensors) resumes in TE's FusedAdam
    (a step per parameter group) and back (megatron_prolong/train/adam_steps.py), on the plugin
    path both times: the losses follow an uninterrupted FusedAdam run to the TE-vs-plugin tolerance
    (the two Adams round differently in fp32)."""
    no_te = _pythonpath_without_te()
    reference = train(tmp_path / "ref", *RUN, "train.steps=6", "checkpoint.save_interval=0").losses
    train(tmp_path / "a", *RUN, "train.steps=2", env=no_te)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    fused = train(tmp_path / "b", *RUN, "train.steps=4")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    back = train(tmp_path / "c", *RUN, "train.steps=6", env=no_te)
    assert "resumed from" in fused.output and "resumed from" in back.output
    losses = fused.losses[-2:] + back.losses[-2:]
    rel = [abs(a - b) / b for a, b in zip(losses, reference[2:])]
    print("steps 3-6 across Adam implementations, relative loss difference:", " ".join(f"{r:.2e}" for r in rel))
    assert len(rel) == 4 and max(rel) < 5e-3, rel
