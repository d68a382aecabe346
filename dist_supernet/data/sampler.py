"""Per-rank shards of a dataset, reshuffled each epoch, resumable mid-epoch.

Like ``torch.utils.data.DistributedSampler`` with ``drop_last=True``: every
epoch one permutation seeded from ``(seed, epoch)`` is cut into
``num_replicas`` interleaved shards of equal length, so ranks never overlap
and all take the same number of steps. Unlike it, the sampler hands out whole
batches and remembers how many it has handed out, so a checkpoint can resume
in the middle of an epoch at the exact next batch.
"""

import torch


class ShardSampler:
    """Batches of indices into a dataset of ``num_samples``, for rank ``rank``.

    Example::
        >>> s = ShardSampler(10, num_replicas=2, rank=1, batch_size=2, seed=0)
        >>> s.num_batches_per_epoch
        2
        >>> first = next(s); state = s.state_dict(); second = next(s)
        >>> s.load_state_dict(state); torch.equal(next(s), second)
        True
    """

    def __init__(
        self, num_samples: int, *, num_replicas: int, rank: int, batch_size: int, seed: int = 0,
        shuffle: bool = True,
    ):
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shard_size = num_samples // num_replicas
        if batch_size < 1 or self.shard_size < batch_size:
            raise ValueError(
                f"batch_size={batch_size}: must be between 1 and the "
                f"{self.shard_size} samples of each rank's shard"
            )
        self.num_batches_per_epoch = self.shard_size // batch_size
        # Position: the next batch is batch `batch_index` of epoch `epoch`.
        self.epoch = 0
        self.batch_index = 0
        self._shard: torch.Tensor | None = None

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's indices for ``epoch``, shape (shard_size,)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        return order[: self.shard_size * self.num_replicas][self.rank :: self.num_replicas]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.batch_index == self.num_batches_per_epoch:
            self.epoch, self.batch_index, self._shard = self.epoch + 1, 0, None
        if self._shard is None:
            self._shard = self.shard(self.epoch)
        start = self.batch_index * self.batch_size
        self.batch_index += 1
        return self._shard[start : start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
        self.seed = int(state.get("seed", self.seed))
        self._shard = None
