"""Start processes groups, train, tear down; CPU runs go through the CPU compatibility layer."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_prolong.config import ProLongConfig
from megatron_prolong.parallel.cpu_compat import cpu_compat
from megatron_prolong.parallel.distributed import init_distributed, shutdown

if TYPE_CHECKING:
    from megatron_prolong.train.loop import StepHook, Trainer


def run(cfg: ProLongConfig, resolved_yaml: str,
        hooks: Callable[[Trainer], list[StepHook]] = lambda trainer: []) -> None:
    """``hooks`` gives the built trainer's step hooks (the entry point's in-training evaluation)."""
    with cpu_compat():
        from megatron_prolong.train.checkpoint import CheckpointError
        from megatron_prolong.train.loop import Preempted, Trainer

        topo = init_distributed(cfg.parallel, cfg.train.seed)
        exit_code = 0
        try:
            if topo.rank == 0:
                Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
                (Path(cfg.run.dir) / "config.yaml").write_text(resolved_yaml)
            trainer = Trainer(cfg, topo).build()
            gc.enable()  # paused while starting (train/__main__.py, megatron_prolong/gc_policy.py)
            trainer.hooks.extend(hooks(trainer))
            trainer.run()
        except Preempted as stop:
            exit_code = stop.exit_code
        except CheckpointError as err:  # refused before training or before a save, in one line
            print(f"megatron-prolong: {err}", file=sys.stderr, flush=True)
            exit_code = 2
        finally:
            shutdown()
    if exit_code:
        sys.exit(exit_code)
