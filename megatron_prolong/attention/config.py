"""What users may set about the plugin's attention (``model.attention.*`` in the Hydra config).

Plain dataclass, importable with torch alone (the GPU benchmark machine has no Hydra); the
training config composes it (:class:`megatron_prolong.config.ModelConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

KERNELS = ("auto", "reference", "sdpa", "flex", "cudnn")
CP_SPLITS = ("balanced", "spread", "zigzag")


@dataclass
class AttentionConfig:
    #: auto picks per device, layout and CP size (the table in ``dispatch.AUTO_RULES``)
    kernel: str = "auto"
    #: how query tokens are assigned to CP ranks (split.py): ``balanced`` keeps documents whole
    #: on one rank where the ranks' causal work stays within ``cp_balance_bound`` and spreads
    #: the rest; ``spread`` spreads every long document over all ranks; ``zigzag`` is chunks r
    #: and 2C-1-r of the whole row
    cp_split: str = "balanced"
    #: balanced: the largest max / mean per-rank causal work accepted before documents are
    #: spread over more ranks (the ``spread`` split is the last resort)
    cp_balance_bound: float = 1.02
    #: spread (and balanced's last resort): a document is cut over all CP ranks when every piece
    #: gets at least this many tokens (one cuDNN query tile: smaller pieces waste most of it) ...
    cp_min_chunk: int = 128
    #: ... or when its causal work exceeds this fraction of one rank's share (a document that
    #: large cannot be placed whole without unbalancing the ranks)
    cp_split_work_fraction: float = 0.1
    #: flex block mask block size (queries and keys); 128 is flex_attention's default tile
    flex_block_size: int = 128
    #: reference backend: elements of one score block (bounds its memory)
    reference_block_elements: int = 1 << 24
    #: cudnn: fewest sequences a graph is built for (the count is padded to a power of two)
    cudnn_doc_bucket_min: int = 8
    #: cudnn: smallest maximum-length bucket (lengths are padded to a power of two)
    cudnn_seq_bucket_min: int = 128
    #: cudnn: graphs kept per process (least recently used out first); each bucket of sequence
    #: count, lengths and totals needs its own (~0.2 s to build)
    cudnn_graph_cache: int = 64

    def check(self, prefix: str = "attention") -> None:
        """ValueError naming the key for a value that cannot work."""
        if self.kernel not in KERNELS:
            raise ValueError(f"{prefix}.kernel={self.kernel!r} is not one of {', '.join(KERNELS)}")
        if self.cp_split not in CP_SPLITS:
            raise ValueError(
                f"{prefix}.cp_split={self.cp_split!r} is not one of {', '.join(CP_SPLITS)}")
        for key in ("cp_min_chunk", "flex_block_size", "reference_block_elements",
                    "cudnn_doc_bucket_min", "cudnn_seq_bucket_min", "cudnn_graph_cache"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)} must be >= 1")
        if not self.cp_balance_bound >= 1:
            raise ValueError(f"{prefix}.cp_balance_bound={self.cp_balance_bound} must be >= 1 "
                             "(max / mean per-rank work; 1.02 is the default)")
        if not self.cp_split_work_fraction > 0:
            raise ValueError(
                f"{prefix}.cp_split_work_fraction={self.cp_split_work_fraction} must be > 0")
