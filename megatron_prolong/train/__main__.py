"""Training entry point: ``python -m megatron_prolong.train [hydra overrides]``.

With no overrides it trains the tiny demo. ``experiment=NAME --cfg job`` prints the resolved
configuration without starting anything (Hydra's own flag).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from megatron_prolong.config import ConfigError, ProLongConfig, register_configs, validate

register_configs()


def _to_typed(raw: DictConfig) -> ProLongConfig:
    return OmegaConf.to_object(raw)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    from megatron_prolong.parallel.distributed import world_size_from_env

    cfg = _to_typed(raw)
    try:
        validate(cfg, world_size_from_env())
    except ConfigError as err:
        print(f"megatron-prolong: invalid configuration: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    # Heavy imports only once the configuration is known to be valid.
    from megatron_prolong.train.run import run

    run(cfg, OmegaConf.to_yaml(raw, resolve=True))


if __name__ == "__main__":
    main()
