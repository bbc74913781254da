"""mosaicml-streaming's MDS shard readers and writer, imported without the package's ``__init__``.

``import streaming`` (and so any ``from streaming.base.format import ...``) first runs
``streaming/__init__.py`` and ``streaming/base/__init__.py``, which import its vision and text
datasets (torchvision, transformers) and its ``StreamingDataset`` machinery: about 1.2 s of CPU in
every trainer process, for the few modules of ``streaming.base.format`` that reading and writing
MDS shards use (about 0.05 s). Here those modules are imported with the two package ``__init__``
files held back: placeholders stand in for the packages while ``streaming.base.format`` loads and
are removed after, so a later ``import streaming`` anywhere in the process runs the real
``__init__`` files (and reuses the modules loaded here).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import time
from types import ModuleType

_PACKAGES = ("streaming", "streaming.base")
_lock = threading.Lock()


def mds_format() -> ModuleType:
    """``streaming.base.format`` (``reader_from_json``, ``MDSWriter``, ...)."""
    loaded = sys.modules.get("streaming.base.format")
    if loaded is not None:
        return loaded
    with _lock:
        placeholders = []
        try:
            for name in _PACKAGES:
                if name not in sys.modules:
                    spec = importlib.util.find_spec(name)
                    if spec is None:  # not installed: the import below raises the usual error
                        break
                    sys.modules[name] = importlib.util.module_from_spec(spec)  # not executed
                    placeholders.append(name)
            return importlib.import_module("streaming.base.format")
        finally:
            for name in placeholders:
                sys.modules.pop(name, None)


def finish_writer(writer) -> None:
    """``writer.finish()`` (an ``MDSWriter`` writing to a local folder) without its whole-second wait.

    The writer hands each shard it flushes to a thread pool for upload (nothing to do for a local
    folder) and, before writing ``index.json``, polls that pool's queue once a second until it is
    empty. ``finish()`` flushes the last shard just before that check, so its upload was nearly
    always still queued and every finish slept a second: two per synthetic corpus, in every new run
    folder. Here the last shard is flushed first (what ``finish()`` does first) and its upload
    awaited in 1 ms polls, so that the check finds the queue empty. Should the writer's internals
    differ (another mosaicml-streaming version), it is simply ``finish()``.
    """
    queue = getattr(getattr(writer, "executor", None), "_work_queue", None)
    if queue is not None and hasattr(writer, "_reset_cache") and writer.new_samples and not writer.event.is_set():
        writer.flush_shard()
        writer._reset_cache()
        while queue.qsize() > 0 and not writer.event.is_set():
            time.sleep(0.001)
    writer.finish()
