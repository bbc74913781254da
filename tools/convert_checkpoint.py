#!/usr/bin/env python
"""Checkpoint conversion (thin wrapper; the logic lives in megatron_prolong.convert).

    python tools/convert_checkpoint.py hf-to-mcore --input Llama-3-8B-Instruct --output ckpt/llama3 \
        --rope-base 8e6 --seq-length 65536
    python tools/convert_checkpoint.py mcore-to-hf --input runs/stage1/checkpoints --output hf/stage1
    python tools/convert_checkpoint.py nemo-to-mcore --input model.nemo --output ckpt/from_nemo
    python tools/convert_checkpoint.py mcore-to-nemo --input ckpt/llama3 --output nemo2/llama3
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # Megatron's checkpoint writer starts worker processes: keep the guard
    from megatron_prolong.gc_policy import skip_collection_at_exit

    skip_collection_at_exit()
    from megatron_prolong.convert.cli import main

    sys.exit(main())
