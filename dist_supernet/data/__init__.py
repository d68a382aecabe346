"""Embedded datasets (no download), per-rank resumable shards, batches and evaluation sets.

Two kinds, one interface the trainer reads (``kind``, ``model_inputs``, ``train_batches``,
``eval_batches``, ``eval_metrics``, ``check_eval``, ``info``):

- images (``datasets.py``): digits, mnist5k, your ``.npz``;
- text (``text.py``): Python's own documentation as a character-level corpus, or your text file.
"""

from dist_supernet.data.datasets import DATASETS, Dataset, ImageBatches, load_data, load_dataset
from dist_supernet.data.sampler import ShardSampler
from dist_supernet.data.text import TextBatches, TextDataset, load_text

__all__ = ["DATASETS", "Dataset", "ImageBatches", "ShardSampler", "TextBatches", "TextDataset", "load_data",
           "load_dataset", "load_text"]
