"""Model FLOPs (6 x matmul params per token + causal in-document attention pairs) and MFU."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.config import ModelConfig
from megatron_prolong.train.flops import (
    GPU_SPECS,
    PeakAlarm,
    attention_flops,
    document_lengths,
    gpu_spec,
    matmul_params,
    mfu,
    model_flops_per_step,
    model_tflops_per_gpu,
    param_count,
)

LLAMA3_8B = ModelConfig(name="llama3_8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                        num_attention_heads=32, num_query_groups=8, vocab_size=128256)
V = 128256


def test_llama3_8b_parameter_count():
    # Hugging Face's Meta-Llama-3-8B: 8,030,261,248 parameters.
    assert param_count(LLAMA3_8B, V) == 8_030_261_248
    # Per layer: q 4096^2, k and v 4096 x 1024 each, o 4096^2, gate/up/down 3 x 4096 x 14336.
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert per_layer == 218_103_808
    # Matmul params: layers + output layer; no embedding (a lookup), no norms.
    assert matmul_params(LLAMA3_8B, V) == 32 * per_layer + 4096 * V == 7_504_658_432


def test_tiny_model_by_hand():
    # 1 layer, h 4, 2 heads (d_head 2), 1 KV group (kv width 2), FFN 8, vocabulary 10.
    m = ModelConfig(num_layers=1, hidden_size=4, ffn_hidden_size=8, num_attention_heads=2, num_query_groups=1)
    # q 4x4 + k 4x2 + v 4x2 + o 4x4 + 3 x 4x8 = 16 + 8 + 8 + 16 + 96 = 144; output 4 x 10 = 40.
    assert matmul_params(m, 10) == 184
    # Documents of 2 and 3 tokens: 5 tokens; causal in-document pairs 3 + 6 = 9.
    # Matmuls 6 x 184 x 5 = 5520; attention 3 (fwd+bwd) x 1 layer x 4 x d_head 2 x 2 heads x 9 = 432.
    assert model_flops_per_step(m, 10, [2, 3]) == 5520 + 432
    assert model_flops_per_step(m, 10, cu_seqlens=[[0, 2, 5]]) == 5952
    # Padding as the loader writes it (repeated last boundary = empty documents) counts nothing.
    assert model_flops_per_step(m, 10, cu_seqlens=[torch.tensor([[0, 2, 5, 5, 5]])]) == 5952


def test_one_document_vs_many():
    one = attention_flops(LLAMA3_8B, [65536])
    # Forward per layer 4 * 128 * 32 * L(L+1)/2, x3 for fwd+bwd, x32 layers.
    assert one == 3 * 32 * 4 * 128 * 32 * 65536 * 65537 // 2
    eight = attention_flops(LLAMA3_8B, [8192] * 8)
    assert eight == 3 * 32 * 4 * 128 * 32 * 8 * 8192 * 8193 // 2
    assert eight / one == pytest.approx(1 / 8, rel=1e-3)  # masked cross-document pairs are not counted
    # Same tokens, so the matmul part is identical.
    diff = model_flops_per_step(LLAMA3_8B, V, [65536]) - model_flops_per_step(LLAMA3_8B, V, [8192] * 8)
    assert diff == one - eight
    # A 64K single-document sequence: about 4.5e10 matmul + 5.2e10 attention FLOPs per token.
    per_token = model_flops_per_step(LLAMA3_8B, V, [65536]) / 65536
    assert per_token == pytest.approx(6 * 7_504_658_432 + 3 * 32 * 4 * 128 * 32 * 65537 / 2)


def test_cu_seqlens_of_a_micro_batch_of_two_sequences():
    cu = torch.tensor([[0, 100, 300, 300], [0, 50, 250, 300]], dtype=torch.int32)
    assert document_lengths(cu_seqlens=[cu]) == [100, 200, 0, 50, 200, 50]
    assert model_flops_per_step(LLAMA3_8B, V, cu_seqlens=[cu, cu]) == model_flops_per_step(
        LLAMA3_8B, V, [100, 200, 50, 200, 50] * 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="exactly one"):
        model_flops_per_step(LLAMA3_8B, V)
    with pytest.raises(ValueError, match="exactly one"):
        model_flops_per_step(LLAMA3_8B, V, [1], cu_seqlens=[[0, 1]])
    with pytest.raises(ValueError, match="non-decreasing"):
        document_lengths(cu_seqlens=[[0, 5, 3]])
    with pytest.raises(ValueError, match="train.gpu"):
        gpu_spec("h300")


def test_mfu():
    assert GPU_SPECS["h100_80gb"].bf16_tflops == 989.0
    assert GPU_SPECS["a100_80gb"].bf16_tflops == 312.0
    assert GPU_SPECS["h200"].memory_gib > GPU_SPECS["h100_80gb"].memory_gib > 79
    flops = 989e12 * 8 * 2 * 0.4  # 40% of 8 H100s for 2 seconds
    assert model_tflops_per_gpu(flops, 2.0, 8) == pytest.approx(395.6)
    assert mfu(flops, 2.0, 8, 989.0) == pytest.approx(0.4)
    # paper (docs/recipe.md): 3,095 tokens/s/GPU at 64K; for one-document sequences that is ~30% MFU on H100.
    per_token = model_flops_per_step(LLAMA3_8B, V, [65536]) / 65536
    assert mfu(per_token * 3095, 1.0, 1, 989.0) == pytest.approx(0.30, abs=0.01)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1, 989.0)


def test_peak_alarm_fires_above_peak_only_and_once(capsys):
    alarm = PeakAlarm("h100_80gb", "tp=1 pp=1 cp=8 dp=1")
    # 989 TFLOP/s on 8 GPUs for 1 s: exactly the peak, possible.
    assert alarm.message(1, 989e12 * 8, 1.0, 8) is None
    assert not alarm.check(1, 989e12 * 8, 1.0, 8)
    # An 8B step at 512K counted with full attention, run in 1/8 of the time a real CP takes.
    flops = model_flops_per_step(LLAMA3_8B, V, [524288] * 8)
    text = alarm.message(7, flops, 20.0, 64)
    tflops = model_tflops_per_gpu(flops, 20.0, 64)
    assert tflops > 989
    assert f"step 7 ran at {tflops:.4g} model TFLOP/s per GPU" in text
    assert "peak of 989 TFLOP/s of train.gpu=h100_80gb" in text and f"{flops:.3e} FLOPs in 20.000 s on 64 GPU(s)" in text
    assert "layout tp=1 pp=1 cp=8 dp=1" in text and "context parallelism" in text
    assert alarm.check(7, flops, 20.0, 64) and alarm.check(8, flops, 20.0, 64)
    err = capsys.readouterr().err
    assert err.count("WARNING: step") == 1 and "step 7 ran at" in err  # once, for the first such step
    quiet = PeakAlarm("h100_80gb", "tp=1", enabled=False)  # ranks other than the logger
    assert quiet.check(7, flops, 20.0, 64) and capsys.readouterr().err == ""


def test_peak_alarm_in_a_real_run(tmp_path):
    """The trainer warns once, with the step's numbers, on a GPU type whose peak the CPU run exceeds
    (a spec with a 1 MFLOP/s peak, added to the table by the wrapper: no real GPU is that slow)."""
    import subprocess
    import sys

    from trainrun import REPO, _env, read_metrics

    wrapper = (
        "import runpy, sys\n"
        "from megatron_prolong.train import flops\n"
        "flops.GPU_SPECS['slow_test_gpu'] = flops.GPUSpec('a GPU with a 1 MFLOP/s peak', 80.0, 1e-6, 1.0)\n"
        "sys.argv[0] = 'megatron_prolong.train'\n"
        "runpy.run_module('megatron_prolong.train', run_name='__main__')\n"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, f"run.dir={run_dir}", "train.gpu=slow_test_gpu", "train.steps=3",
         "data.seq_length=256", "train.global_batch_size=2", "train.micro_batch_size=1",
         "log.tensorboard=false", "checkpoint.save_interval=0"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("WARNING: step") == 1, proc.stderr[-3000:]
    first = read_metrics(run_dir)[0]
    assert first["tflops_per_gpu"] > 1e-6 and first["mfu"] > 1
    assert f"step 1 ran at {first['tflops_per_gpu']:.4g} model TFLOP/s per GPU" in proc.stderr
    assert "train.gpu=slow_test_gpu" in proc.stderr and "layout tp=1 pp=1 cp=1 dp=1" in proc.stderr
