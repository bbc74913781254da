"""``python -m megatron_prolong.train [hydra overrides]``: starts the training command. The command
is composed in :mod:`megatron_prolong.main` (the trainer and the in-training evaluation hook), which
stands above ``train/`` and ``eval/``; ``-m`` runs a package's ``__main__``, so this file only
hands over to it."""

import atexit
import gc

# Starting creates about a million objects (torch, Megatron-Core, the model) that live as long as the
# process; the collector, run every few hundred allocations meanwhile, frees nearly nothing and cost
# about 1.5 s of CPU a process. It is on again once the trainer is built (train/run.py).
gc.disable()
# At exit the interpreter's last collection walks those objects again (about 1.5 s of CPU a process,
# after the run's last line); frozen, they are left to the process's end. Registered first, this runs
# after every other exit handler (multiprocessing's, Megatron's), just before that collection.
atexit.register(gc.freeze)

from megatron_prolong.main import cli  # noqa: E402  (after gc.disable: it imports torch)

if __name__ == "__main__":
    cli()
