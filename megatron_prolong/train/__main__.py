"""``python -m megatron_prolong.train [hydra overrides]``: starts the training command. The command
is composed in :mod:`megatron_prolong.main` (the trainer and the in-training evaluation hook), which
stands above ``train/`` and ``eval/``; ``-m`` runs a package's ``__main__``, so this file only
hands over to it."""

from megatron_prolong.gc_policy import pause_collection_while_starting

pause_collection_while_starting()

from megatron_prolong.main import cli  # noqa: E402  (after the pause: it imports torch)

if __name__ == "__main__":
    cli()
