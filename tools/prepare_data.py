#!/usr/bin/env python
"""Raw text (jsonl / parquet / Hugging Face save_to_disk) -> tokenized, packed MDS in ProLong's
layout or Megatron indexed datasets. See megatron_prolong/data/prepare.py for the details.

Examples:
  # pre-training text, length-bucketed like ProLong (books-524288/, books-65536/, books/)
  python tools/prepare_data.py raw/books.jsonl --output data/ --name books \\
      --tokenizer /models/Llama-3-8B-Instruct --seq-length 65536 --bucket --workers 16
  # SFT conversations in the prolong-ultrachat-64K layout
  python tools/prepare_data.py ultrachat.jsonl --output data/ --name prolong-ultrachat-64K \\
      --tokenizer /models/Llama-3-8B-Instruct --sft --seq-length 65536
  # Megatron indexed dataset (packed online by the loader)
  python tools/prepare_data.py raw/ --output data/ --name web --tokenizer byte --format indexed
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_prolong.gc_policy import skip_collection_at_exit

    skip_collection_at_exit()
    from megatron_prolong.data.prepare import main

    main()
