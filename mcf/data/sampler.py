"""A distributed sampler that is a pure function of ``(seed, epoch)``, resumable mid-epoch.

Each epoch draws one global permutation from ``(seed, epoch)``; the first
``world_size * (n // world_size)`` entries are dealt round-robin, so every rank gets the same number
of samples, the shares are disjoint, and together they cover the epoch (the ``n % world_size``
left-over samples of an epoch wait for another epoch's permutation). ``set_start(k)`` skips the
first ``k`` samples of this rank's share, which is how a resumed run continues exactly.

Numpy only (DALI's source workers import it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class DistributedSampler:
    """Yields ``(epoch, index)`` pairs of this rank's share of an epoch.

    Args:
        num_samples: dataset size.
        rank, world_size: this rank and the number of ranks.
        seed: base seed; the order is a function of ``(seed, epoch)`` only.
        shuffle: permute (True) or keep dataset order (False).
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start = 0
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def per_rank(self) -> int:
        """Samples per rank per epoch (equal on every rank)."""
        return self.num_samples // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Begin the next iteration at position ``start`` of this rank's share."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} outside 0..{self.per_rank}")
        self.start = int(start)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's share of ``epoch`` (int64 dataset indices, in order)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.num_samples
        if self.shuffle:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x73616D70]).permutation(n)
        else:
            order = np.arange(n)
        share = order[: self.per_rank * self.world_size][self.rank :: self.world_size].astype(np.int64)
        self._cache = (epoch, share)
        return share

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for i in self.indices(epoch)[self.start :]:
            yield (epoch, int(i))

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __getstate__(self) -> dict:
        # Pickled into DALI workers: leave the cached permutation (up to n int64) behind.
        return dict(self.__dict__, _cache=None)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.set_epoch(d["epoch"])
        self.set_start(d["start"])
