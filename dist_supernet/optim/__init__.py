"""Birder optimizer, its DDP comm hook and state."""

from dist_supernet.optim.birder import Birder, BirderDDP
from dist_supernet.optim.hook import BirderState, birder_hook

__all__ = ["Birder", "BirderDDP", "BirderState", "birder_hook"]
