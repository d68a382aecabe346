"""Embedded datasets (no download) and per-rank resumable shards."""

from dist_supernet.data.datasets import DATASETS, Dataset, load_dataset
from dist_supernet.data.sampler import ShardSampler

__all__ = ["DATASETS", "Dataset", "ShardSampler", "load_dataset"]
