"""Epoch orders evaluated on demand: a rank's n-th sample id in O(1) memory, whatever the number
of records (the materialised order took ~40 bytes per record per rank: 40 GB at 10⁹ records).

    order = EpochOrder(counts=[...], sizes=[...], offsets=[...], seed=0, epoch=3, shuffle=True)
    order[np.arange(1000, 2000)]               # sample ids at positions 1000..1999 of the epoch
    part = RankPart(order, layers, rank, world_size)
    part[i]                                    # this rank's i-th sample id (cached by blocks)

An epoch is the concatenation over sources of `counts[i]` draws from source i (its records in a
fresh permutation per repetition, the last one cut short), then shuffled. Both permutations are
keyed Feistel networks (`Permutation`), so nothing of size N is ever built. `RankPart` removes
what ranks of earlier world sizes consumed (the layers of a resume at another world size; each
layer's consumed entries differ between ranks by at most the spread of their cursors, so it is
an explicit short head plus an arithmetic tail) and takes every world_size-th entry from rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of x ^ key: a well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random permutation of [0, n): a 4-round balanced Feistel network over the
    smallest even number of bits that covers n, cycle-walking (applied again to any output ≥ n:
    still a bijection of [0, n), at most 4 passes expected since the domain is < 4n)."""

    ROUNDS = 4

    def __init__(self, n: int, key: Sequence[int]):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = np.random.SeedSequence(list(key)).generate_state(self.ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right, k) & self.mask)
        return (left << self.half) | right

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            y = self._encrypt(np.asarray(x, dtype=np.uint64))
            out = y >= self.n
            while out.any():
                y[out] = self._encrypt(y[out])
                out = y >= self.n
        return y.astype(np.int64)


class EpochOrder:
    """The sample ids of one epoch, by position (see the module docstring)."""

    def __init__(self, counts: Sequence[int], sizes: Sequence[int], offsets: Sequence[int],
                 seed: int, epoch: int, shuffle: bool):  # fmt: skip
        self.counts = np.asarray(counts, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.asarray(offsets[: len(sizes)], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.global_perm = Permutation(len(self), (seed, epoch)) if shuffle and len(self) else None
        self._draws: dict[tuple[int, int], Permutation] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        q = np.asarray(positions, dtype=np.int64)
        if self.global_perm is not None:
            q = self.global_perm(q)
        src = np.searchsorted(self.starts, q, side="right") - 1
        j = q - self.starts[src]
        n = self.sizes[src]
        rep, k = j // n, j % n
        if self.shuffle:
            for s, r in set(zip(src.tolist(), rep.tolist())):
                sel = (src == s) & (rep == r)
                k[sel] = self._draw(s, r)(k[sel])
        return self.offsets[src] + k

    def _draw(self, source: int, rep: int) -> Permutation:
        """The permutation of source `source`'s records in its rep-th repetition this epoch."""
        key = (source, rep)
        if key not in self._draws:
            self._draws[key] = Permutation(int(self.sizes[source]),
                                           (self.seed, self.epoch, source, rep))  # fmt: skip
        return self._draws[key]


class _Layer:
    """What remains of a sequence of `length` entries once ranks of world size w consumed the
    first cursors[r] of the entries r, r+w, r+2w, … each: entries [0, w·min) are gone, those in
    [w·min, w·max) partly (`head`: the survivors), those from w·max on all remain."""

    def __init__(self, length: int, world_size: int, cursors: Sequence[int]):
        c = np.asarray(cursors, dtype=np.int64)
        lo, hi = world_size * int(c.min()), world_size * int(c.max())
        idx = np.arange(lo, min(hi, length), dtype=np.int64)
        self.head = idx[(idx // world_size) >= c[idx % world_size]]
        self.tail_start = hi
        self.length = len(self.head) + max(0, length - hi)

    def __call__(self, m: np.ndarray) -> np.ndarray:
        """Indices into the sequence before this layer of entries m after it."""
        h = len(self.head)
        inside = m < h
        return np.where(inside, self.head[np.minimum(m, max(h - 1, 0))] if h else 0,
                        self.tail_start + (m - h))  # fmt: skip


class RankPart:
    """This rank's share of an epoch: after the layers, every world_size-th entry from rank.
    Indexing by an int computes a block of BLOCK ids at a time and keeps it."""

    BLOCK = 4096

    def __init__(self, order: EpochOrder, layers: Sequence[dict], rank: int, world_size: int):
        self.order, self.rank, self.world_size = order, rank, world_size
        self.layers: list[_Layer] = []
        length = len(order)
        for layer in layers:
            self.layers.append(_Layer(length, layer["world_size"], layer["cursors"]))
            length = self.layers[-1].length
        self.remaining = length
        self.length = max(0, -(-(length - rank) // world_size))
        self._block_start, self._block = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.length

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Sample ids of this part's entries [start, stop)."""
        m = self.rank + self.world_size * np.arange(start, min(stop, self.length), dtype=np.int64)
        for layer in reversed(self.layers):
            m = layer(m)
        return self.order[m]

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.length:
            raise IndexError(i)
        if not self._block_start <= i < self._block_start + len(self._block):
            self._block_start = i - i % self.BLOCK
            self._block = self.ids(self._block_start, self._block_start + self.BLOCK)
        return int(self._block[i - self._block_start])
