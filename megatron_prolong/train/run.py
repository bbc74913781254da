"""Start processes groups, train, tear down; CPU runs go through the CPU compatibility layer."""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_prolong.config import ProLongConfig
from megatron_prolong.parallel.cpu_compat import cpu_compat
from megatron_prolong.parallel.distributed import init_distributed, shutdown


def run(cfg: ProLongConfig, resolved_yaml: str) -> None:
    with cpu_compat():
        from megatron_prolong.train.checkpoint import CheckpointError
        from megatron_prolong.train.loop import Preempted, Trainer

        topo = init_distributed(cfg.parallel, cfg.train.seed)
        exit_code = 0
        try:
            if topo.rank == 0:
                Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
                (Path(cfg.run.dir) / "config.yaml").write_text(resolved_yaml)
            Trainer(cfg, topo).run()
        except Preempted as stop:
            exit_code = stop.exit_code
        except CheckpointError as err:  # refused before training, in one line
            print(f"megatron-prolong: {err}", file=sys.stderr, flush=True)
            exit_code = 2
        finally:
            shutdown()
    if exit_code:
        sys.exit(exit_code)
