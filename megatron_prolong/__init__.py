"""megatron-prolong: ProLong long-context training on Megatron-Core.

Kept import-free so light tools (attention benchmarks, data preparation) load without Megatron.
"""

__version__ = "0.1.0"
