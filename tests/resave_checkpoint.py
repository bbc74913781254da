"""Load a run's latest checkpoint into the configured layout and save it again, without a step.

``python -m torch.distributed.run --nproc_per_node N tests/resave_checkpoint.py run.dir=... [overrides]``:
what the new layout loaded, written back at the same step, to compare with what was saved.
"""

from __future__ import annotations

import sys

from megatron_prolong.gc_policy import pause_collection_while_starting

pause_collection_while_starting()  # as the trainer: this short-lived process keeps nearly all it makes

from trainrun import compose_config  # noqa: E402

from megatron_prolong.config import validate  # noqa: E402
from megatron_prolong.parallel.cpu_compat import cpu_compat  # noqa: E402
from megatron_prolong.parallel.distributed import init_distributed, shutdown, world_size_from_env  # noqa: E402

if __name__ == "__main__":
    cfg = compose_config(*sys.argv[1:])
    validate(cfg, world_size_from_env())
    with cpu_compat():
        from megatron_prolong.train.loop import Trainer

        topo = init_distributed(cfg.parallel, cfg.train.seed)
        try:
            Trainer(cfg, topo).build().save()
        finally:
            shutdown()
