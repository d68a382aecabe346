"""Birder optimizer, its DDP comm hook and state."""

from dist_supernet.optim.birder import Birder, BirderDDP
from dist_supernet.optim.compressor import BirderCompressor, Chunk
from dist_supernet.optim.hook import BirderState, birder_hook

__all__ = ["Birder", "BirderCompressor", "BirderDDP", "BirderState", "Chunk", "birder_hook"]
