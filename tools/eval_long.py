#!/usr/bin/env python
"""Long-context evaluation (thin wrapper; the logic lives in megatron_prolong.eval).

    python tools/eval_long.py score --checkpoint ckpt/llama3 --input lines.jsonl --output scored.jsonl
    torchrun --nproc_per_node=4 tools/eval_long.py score --tp 2 --cp 2 --checkpoint ... --input ... --output ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from megatron_prolong.gc_policy import skip_collection_at_exit

    skip_collection_at_exit()
    from megatron_prolong.eval.cli import main

    sys.exit(main())
