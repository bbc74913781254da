"""The training command, ``python -m megatron_prolong.train [hydra overrides]``: checks the
configuration, then builds the trainer with its step hooks (the in-training evaluation of
``eval/``). It is the one module that knows both ``train/`` and ``eval/``, so neither imports the
other's way up; ``train/__main__.py`` only starts it.

With no overrides it trains the tiny demo. ``experiment=NAME --cfg job`` prints the resolved
configuration without starting anything (Hydra's own flag).
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from typing import TYPE_CHECKING, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from megatron_prolong.config import ConfigError, ProLongConfig, register_configs, validate
from megatron_prolong.train.console import quiet_libraries

if TYPE_CHECKING:
    from megatron_prolong.train.loop import StepHook, Trainer

register_configs()


def _to_typed(raw: DictConfig) -> ProLongConfig:
    return OmegaConf.to_object(raw)


def refuse(err: ConfigError) -> NoReturn:
    print(f"megatron-prolong: invalid configuration: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_experiment(argv: list[str]) -> None:
    """Refuse ``experiment=NAME`` naming no preset in one line, before Hydra composes anything (its
    own error is a multi-line composition failure)."""
    presets = sorted(f.name.removesuffix(".yaml") for f in resources.files("megatron_prolong.conf")
                     .joinpath("experiment").iterdir() if f.name.endswith(".yaml"))
    for arg in argv:
        key, _, name = arg.lstrip("+").partition("=")
        if key == "experiment" and name not in presets:
            raise ConfigError(f"experiment={name} is not a preset; the presets are {', '.join(presets)} "
                              "(names are lower case: experiment=prolong_64k)")


def check_memory(cfg: ProLongConfig, world_size: int) -> str | None:
    """Refuse (or warn about) a layout whose estimated memory exceeds the GPU's, before starting;
    returns the estimate (None when not checked)."""
    from megatron_prolong.model.builder import resolve_attention_backend
    from megatron_prolong.tokenizer import ByteTokenizer
    from megatron_prolong.train.memory import check_fits

    vocab = cfg.model.vocab_size or (ByteTokenizer.vocab_size if cfg.tokenizer.kind == "byte" else None)
    if cfg.train.memory_check == "off" or vocab is None:
        return None
    try:
        # The backend the trainer will run (``auto`` is the plugin path), not the config's word for it.
        return str(check_fits(cfg.model, cfg.train, cfg.parallel, cfg.data.seq_length, world_size,
                              vocab_size=vocab, gpu=cfg.train.gpu,
                              attention_backend=resolve_attention_backend(cfg.model)))
    except ConfigError as err:
        if cfg.train.memory_check == "error":
            raise ConfigError(f"{err} (train.memory_check=warn or off to start anyway)") from None
        print(f"megatron-prolong: warning: {err}", file=sys.stderr, flush=True)
        return None


def check_prepared_data(cfg: ProLongConfig) -> None:
    """Data already prepared in the run folder must fit the configured sequence length."""
    from megatron_prolong.data.synthetic import synthetic_corpus_exists

    if cfg.data.synthetic:
        try:
            synthetic_corpus_exists(cfg.data.root, cfg.data.seq_length)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def training_hooks(trainer: Trainer) -> list[StepHook]:
    """In-training evaluation when ``eval.every`` is set; it builds its samples when made, so
    missing inputs fail before step 1."""
    if not trainer.cfg.eval.every:
        return []
    from megatron_prolong.eval.in_training import TrainingEval

    return [TrainingEval(trainer)]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(raw: DictConfig) -> None:
    cfg = _to_typed(raw)
    quiet_libraries(cfg.log.verbose)  # before Megatron is imported: its notices come at import

    from megatron_prolong.parallel.distributed import world_size_from_env

    try:
        validate(cfg, world_size_from_env())
        memory = check_memory(cfg, world_size_from_env())
        check_prepared_data(cfg)
        if cfg.eval.every:
            from megatron_prolong.eval.settings import check_training_eval

            check_training_eval(cfg)
    except ConfigError as err:
        refuse(err)
    if os.environ.get("PROLONG_DRY_RUN") == "1":  # the Slurm launchers' --dry-run: checked, nothing started
        print(OmegaConf.to_yaml(raw, resolve=True), end="")
        print(f"megatron-prolong: dry run at {world_size_from_env()} processes: configuration valid; memory "
              f"estimate {memory or 'not checked (train.memory_check=off, or a warning above)'}", flush=True)
        return
    # Heavy imports only once the configuration is known to be valid.
    from megatron_prolong.train.run import run

    try:
        run(cfg, OmegaConf.to_yaml(raw, resolve=True), hooks=training_hooks)
    except ConfigError as err:  # found only once the trainer reads its inputs (eval.data's lines): one line too
        refuse(err)
    except KeyboardInterrupt:  # Ctrl-C before the training loop took it over: nothing to save yet
        print("megatron-prolong: interrupted (Ctrl-C) before the first step; nothing was saved", file=sys.stderr,
              flush=True)
        sys.exit(130)


def cli() -> None:
    """The command line: an unknown preset refused in one line, then Hydra's ``main``."""
    try:
        check_experiment(sys.argv[1:])
    except ConfigError as err:
        refuse(err)
    main()


if __name__ == "__main__":
    cli()
