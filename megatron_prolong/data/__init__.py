"""The data path: mixture config, MDS / Megatron indexed sources, the mixture loader, the
synthetic demo corpus and per-domain metrics."""

from megatron_prolong.data.config import DataConfig, DomainConfig
from megatron_prolong.data.loader import MixtureLoader
from megatron_prolong.data.metrics import DomainTracker
from megatron_prolong.data.sources import DataError
from megatron_prolong.data.synthetic import write_synthetic_corpus

__all__ = ["DataConfig", "DomainConfig", "MixtureLoader", "DomainTracker", "DataError", "write_synthetic_corpus"]
