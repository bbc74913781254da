"""One process group on the CPU (through the compatibility layer) for a test module's models."""

import pytest


@pytest.fixture(scope="module")
def megatron():
    # imported here: the GPU-only kernel tests of this folder run where Hydra is not installed
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.parallel.cpu_compat import cpu_compat
    from megatron_prolong.parallel.distributed import init_distributed, shutdown

    with cpu_compat():
        init_distributed(ParallelConfig(), seed=1)
        yield
        shutdown()
