"""The CPU compatibility layer redirects Megatron's CUDA-only calls, and only while active."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.parallel.cpu_compat import cpu_compat, needed

pytestmark = pytest.mark.skipif(not needed(), reason="a GPU is present: the layer is inactive by design")


def test_cuda_device_arguments_land_on_cpu():
    with cpu_compat():
        x = torch.zeros(3, device="cuda")
        y = torch.ones(2, device=torch.cuda.current_device())
        z = torch.arange(4).cuda()
        w = torch.arange(4).to("cuda")
        assert {t.device.type for t in (x, y, z, w)} == {"cpu"}
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.to(torch.float64).dtype == torch.float64  # non-device .to() untouched


def test_rng_state_round_trips_through_the_cuda_api():
    with cpu_compat():
        state = torch.cuda.get_rng_state()
        a = torch.rand(4)
        torch.cuda.set_rng_state(state)
        assert torch.equal(a, torch.rand(4))


def test_everything_is_restored_on_exit():
    before = torch.cuda.current_device
    with cpu_compat():
        assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.current_device is before
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
