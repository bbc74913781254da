"""Checkpoint conversion: Hugging Face Llama and NeMo <-> the trainer's Megatron distributed checkpoints.

Entry point: ``python tools/convert_checkpoint.py MODE --input IN --output OUT`` (see
docs/conversion.md). Modules: ``mapping`` (the declarative parameter table and fused transforms),
``mcore`` (reading/writing Megatron distributed checkpoints), ``hf``, ``nemo`` and ``cli``.
Heavy imports (Megatron, transformers) happen inside the functions.
"""

from megatron_prolong.convert.mapping import ConversionError

__all__ = ["ConversionError"]
