"""Training entry point: ``python -m megatron_prolong.train [hydra overrides]``.

With no overrides it trains the tiny demo. ``experiment=NAME --cfg job`` prints the resolved
configuration without starting anything (Hydra's own flag).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from megatron_prolong.config import ConfigError, ProLongConfig, register_configs, validate

if TYPE_CHECKING:
    from megatron_prolong.train.loop import StepHook, Trainer

register_configs()


def _to_typed(raw: DictConfig) -> ProLongConfig:
    return OmegaConf.to_object(raw)


def check_memory(cfg: ProLongConfig, world_size: int) -> None:
    """Refuse (or warn about) a layout whose estimated memory exceeds the GPU's, before starting."""
    from megatron_prolong.model.builder import resolve_attention_backend
    from megatron_prolong.tokenizer import ByteTokenizer
    from megatron_prolong.train.memory import check_fits

    vocab = cfg.model.vocab_size or (ByteTokenizer.vocab_size if cfg.tokenizer.kind == "byte" else None)
    if cfg.train.memory_check == "off" or vocab is None:
        return
    try:
        # The backend the trainer will run (``auto`` is the plugin path), not the config's word for it.
        check_fits(cfg.model, cfg.train, cfg.parallel, cfg.data.seq_length, world_size, vocab_size=vocab,
                   gpu=cfg.train.gpu, attention_backend=resolve_attention_backend(cfg.model))
    except ConfigError as err:
        if cfg.train.memory_check == "error":
            raise ConfigError(f"{err} (train.memory_check=warn or off to start anyway)") from None
        print(f"megatron-prolong: warning: {err}", file=sys.stderr, flush=True)


def training_hooks(trainer: Trainer) -> list[StepHook]:
    """In-training evaluation when ``eval.every`` is set; it builds its samples when made, so
    missing inputs fail before step 1."""
    if not trainer.cfg.eval.every:
        return []
    from megatron_prolong.eval.in_training import TrainingEval

    return [TrainingEval(trainer)]


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    from megatron_prolong.parallel.distributed import world_size_from_env

    cfg = _to_typed(raw)
    try:
        validate(cfg, world_size_from_env())
        check_memory(cfg, world_size_from_env())
        if cfg.eval.every:
            from megatron_prolong.eval.settings import check_training_eval

            check_training_eval(cfg)
    except ConfigError as err:
        print(f"megatron-prolong: invalid configuration: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    # Heavy imports only once the configuration is known to be valid.
    from megatron_prolong.train.run import run

    run(cfg, OmegaConf.to_yaml(raw, resolve=True), hooks=training_hooks)


if __name__ == "__main__":
    main()
