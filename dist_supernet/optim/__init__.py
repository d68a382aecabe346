"""Birder optimizer, its DDP comm hook and state."""

from dist_supernet.optim.birder import Birder, BirderDDP
from dist_supernet.optim.compressor import BirderCompressor, Chunk
from dist_supernet.optim.hook import BirderState, birder_hook
from dist_supernet.optim.skips import SkipCounter

__all__ = ["Birder", "BirderCompressor", "BirderDDP", "BirderState", "Chunk", "SkipCounter", "birder_hook"]
