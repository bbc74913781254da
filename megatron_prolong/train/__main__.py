"""``python -m megatron_prolong.train [hydra overrides]``: starts the training command. The command
is composed in :mod:`megatron_prolong.main` (the trainer and the in-training evaluation hook), which
stands above ``train/`` and ``eval/``; ``-m`` runs a package's ``__main__``, so this file only
hands over to it."""

from megatron_prolong.main import cli

if __name__ == "__main__":
    cli()
