"""The epoch order of indexed sources: a permutation computed per index, re-split over any world size.

**The order.** Epoch ``e`` visits the dataset in the order ``perm_e(0), perm_e(1), …, perm_e(n-1)``,
where ``perm_e`` is a pseudo-random bijection of ``[0, n)`` drawn from ``(seed, e)``: an 8-round
Feistel network (FF1's alternating split, a splitmix64 round function) on the smallest power of two
``>= n``, walked back into ``[0, n)`` ("cycle walking", fewer than 2 rounds trips on average). It
costs O(1) memory and O(1) time per index, so no process — rank, DataLoader worker or DALI source
worker — materialises the ``n`` int64 of an explicit permutation (160 MB at 20M samples), and any
process computes any position's index on its own.

**The split.** A position in an epoch is a *global* sample count ``offset``: the positions
``0 … offset-1`` of the epoch's order have been consumed. From ``offset``, rank ``r`` of ``W`` takes
the positions ``offset + r + W·j`` for ``j < (n - offset) // W`` — every rank the same number, the
ranks disjoint. All ranks advance in lockstep (one batch of ``B`` each per micro-step), so after any
number of batches the consumed positions are again a prefix ``0 … offset + k·B·W - 1`` of the
order, and a checkpoint's ``offset`` can be continued with any new ``W'`` (or batch size): the
remaining positions are re-split over the new ranks with none repeated and none skipped. With the
same ``W`` the split is exactly the old one, so a same-size resume is bit-exact.

**Left-overs.** The ``(n - offset) % W`` positions after the last full round, and the positions of a
rank's last partial batch, end the epoch unvisited: an epoch visits the prefix of its order that
fills whole global batches, and the next epoch starts at position 0 of a new order (so the samples
left out differ from epoch to epoch).

Changed in the compact sampler: epoch orders used to be ``numpy.random.default_rng(...).permutation``
dealt round-robin; the Feistel order differs, so a checkpoint written by the old version resumes at
the same position of a different order (no sample is lost across epochs, but the interrupted epoch
is not the one the old version would have finished). Same-version resumes are exact.

Numpy only (DALI's source workers import it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

ROUNDS = 8  # even: the two halves end at their starting widths (see FeistelPermutation._encrypt)
CHUNK = 8192  # indices computed per vectorised call while iterating
_ORDER_TAG = 0x73616D70  # "samp": separates this stream from the other users of the seed
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wraps mod 2**64): every input bit moves every output bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """A pseudo-random bijection of ``[0, n)`` keyed by ``(seed, epoch)``, evaluated per position.

    ``perm(positions)`` maps int positions (any shape) to dataset indices; ``perm(np.arange(n))`` is a
    permutation of ``range(n)``. The object holds ``ROUNDS`` keys, nothing of size ``n``.
    """

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 0:
            raise ValueError("n must be >= 0")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())  # domain 2**bits < 2n (for n > 2): cycle walking ends fast
        self.u, self.v = bits // 2, bits - bits // 2  # widths of the high part A and the low part B
        entropy = [int(seed) & 0xFFFF_FFFF_FFFF_FFFF, int(epoch), _ORDER_TAG]
        self.keys = np.random.SeedSequence(entropy).generate_state(ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """One pass of the network over ``[0, 2**(u+v))`` (uint64 in, uint64 out)."""
        v = np.uint64(self.v)
        a, b = x >> v, x & np.uint64((1 << self.v) - 1)
        for i, key in enumerate(self.keys):
            width = self.u if i % 2 == 0 else self.v  # A's width this round; the halves swap every round
            c = (a + _mix(b ^ key)) & np.uint64((1 << width) - 1)
            a, b = b, c
        return (a << v) | b

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions outside [0, {self.n})")
        y = self._encrypt(pos.astype(np.uint64).ravel())
        outside = np.flatnonzero(y >= np.uint64(self.n))
        while outside.size:  # cycle walking: re-encrypt until the value lands in [0, n)
            y[outside] = self._encrypt(y[outside])
            outside = outside[y[outside] >= np.uint64(self.n)]
        return y.astype(np.int64).reshape(pos.shape)


class RankShare:
    """A rank's share of an epoch's global order, from a global offset (see the module docstring).

    What every mcf sampler shares: positions ``offset + rank + world_size·j`` of epoch ``e``'s order,
    mapped to sample ids by the subclass's :meth:`order_at`; iterating yields ``(epoch, index)`` pairs
    (what :class:`~mcf.data.core.source.TorchSampleDataset` takes), computed ``CHUNK`` at a time; the state
    is ``{"epoch", "offset"}``, valid for any world size.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        self.num_samples, self.rank, self.world_size, self.seed = int(num_samples), rank, world_size, seed
        self.epoch = 0
        self.offset = 0  # global position the next iteration starts at

    def order_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Sample ids at global ``positions`` (int64 array) of ``epoch``'s order."""
        raise NotImplementedError

    @property
    def per_rank(self) -> int:
        """Samples per rank in a whole epoch (equal on every rank)."""
        return self.num_samples // self.world_size

    def share(self, offset: int) -> int:
        """Samples per rank from global position ``offset`` to the end of the epoch."""
        return (self.num_samples - offset) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_offset(self, offset: int) -> None:
        """Begin the next iteration at global position ``offset`` of the epoch (any earlier world size)."""
        if not 0 <= offset <= self.num_samples:
            raise ValueError(f"offset {offset} outside 0..{self.num_samples}")
        self.offset = int(offset)

    def take(self, epoch: int, offset: int, start: int, stop: int) -> np.ndarray:
        """Sample ids (int64) of this rank's share entries ``start … stop-1`` after global ``offset``."""
        if not 0 <= start <= stop <= self.share(offset):
            raise ValueError(
                f"entries {start}..{stop} outside this rank's share 0..{self.share(offset)} after offset {offset}"
            )
        return self.order_at(epoch, offset + self.rank + self.world_size * np.arange(start, stop, dtype=np.int64))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.epoch, self.offset
        count = self.share(offset)
        for start in range(0, count, CHUNK):
            for i in self.take(epoch, offset, start, min(start + CHUNK, count)).tolist():
                yield (epoch, i)

    def __len__(self) -> int:
        return self.share(self.offset)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.set_epoch(d["epoch"])
        self.set_offset(d["offset"])


class DistributedSampler(RankShare):
    """The indexed sources' sampler: the epoch order is a :class:`FeistelPermutation` of ``(seed, epoch)``.

    Args:
        num_samples: dataset size ``n``.
        rank, world_size: this rank and the number of ranks.
        seed: base seed; the order is a function of ``(seed, epoch)`` only.
        shuffle: the Feistel order (True) or dataset order (False).
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        super().__init__(num_samples, rank, world_size, seed)
        self.shuffle = shuffle
        self._order: FeistelPermutation | None = None
        self._order_epoch = -1

    def order(self, epoch: int) -> FeistelPermutation | None:
        """The epoch's order (None = dataset order, ``shuffle=False``)."""
        if not self.shuffle:
            return None
        if self._order is None or self._order_epoch != epoch:
            self._order, self._order_epoch = FeistelPermutation(self.num_samples, self.seed, epoch), epoch
        return self._order

    def order_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        order = self.order(epoch)
        return positions if order is None else order(positions)
