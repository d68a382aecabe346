"""Low-frequency synchronisation between worker groups (DiLoCo, Streaming DiLoCo) with compressed exchanges.

Dependencies: ``sync`` -> ``optim`` (Birder-outer's compressor) -> ``comm`` -> ``kernels``.
"""

from dist_supernet.sync.config import DiLoCoConfig, check
from dist_supernet.sync.diloco import DiLoCo, SyncGroups
from dist_supernet.sync.exchange import MeanExchange, resolve_form
from dist_supernet.sync.quantizers import FP32, QUANTIZERS, Int4, OneBit, Quantizer, build_quantizer

__all__ = ["DiLoCo", "DiLoCoConfig", "FP32", "Int4", "MeanExchange", "OneBit", "QUANTIZERS", "Quantizer",
           "SyncGroups", "build_quantizer", "check", "resolve_form"]
