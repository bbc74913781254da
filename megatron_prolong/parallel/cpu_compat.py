"""Run Megatron-Core on machines without a GPU.

Megatron-Core hard-codes CUDA in a few dozen places (``device='cuda'`` literals, ``.cuda()``,
``torch.cuda.current_device()``, CUDA RNG state, ``torch.cuda.synchronize``, asserts on the type
name ``torch.cuda.FloatTensor``). This module redirects exactly those to the CPU while it is
active, so the same Megatron code path (DDP, optimizer, schedules, dist_checkpointing) runs over
gloo in CI. It is the only place in the package that knows about this; nothing is patched when a
GPU is present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to the CPU and makes ``Tensor.cuda()`` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for a CUDA stream: work on the CPU is already ordered."""

    def wait_stream(self, *args: Any) -> None: ...

    def wait_event(self, *args: Any) -> None: ...

    def synchronize(self) -> None: ...


_PATCHES: dict[str, Any] = {
    "current_stream": lambda *a, **k: _NullStream(),
    "stream": lambda *a, **k: contextlib.nullcontext(),
    # A device object rather than 0: autograd runs backward outside the function mode, where 0 means cuda:0.
    "current_device": lambda: torch.device("cpu"),
    "device_count": lambda: 1,
    "set_device": lambda *a, **k: None,
    "synchronize": lambda *a, **k: None,
    "get_rng_state": lambda *a, **k: torch.get_rng_state(),
    "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
    "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
    "manual_seed_all": lambda seed: torch.default_generator.manual_seed(seed),
    "memory_allocated": lambda *a, **k: 0,
    "max_memory_allocated": lambda *a, **k: 0,
    "reset_peak_memory_stats": lambda *a, **k: None,
    "empty_cache": lambda *a, **k: None,
}


def _module_patches() -> list[tuple[Any, str, Any]]:
    """(module, attribute, replacement) beyond torch.cuda itself."""
    import torch.cuda.random
    from megatron.core.tensor_parallel import random as mcore_random

    return [
        (torch.cuda.random, "get_rng_state", _PATCHES["get_rng_state"]),
        (torch.cuda.random, "set_rng_state", _PATCHES["set_rng_state"]),
        # Megatron's RNG tracker sets CUDA states through a lazy call that never runs without CUDA.
        (mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
    ]


def needed() -> bool:
    return not torch.cuda.is_available()


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Activate the CPU redirection if (and only if) no GPU is present."""
    if not needed():
        yield
        return
    patches = [(torch.cuda, name, fn) for name, fn in _PATCHES.items()] + _module_patches()
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, fn in patches:
        setattr(module, name, fn)
    try:
        with _CudaToCpuMode():
            yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
