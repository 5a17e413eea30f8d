"""data_pipeline/order.py: epoch orders evaluated on demand, in memory that does not grow with
the number of records."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from data_pipeline.order import EpochOrder, Permutation, RankPart


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_keyed_bijection(n):
    x = np.arange(n)
    p = Permutation(n, (5, 1))(x)
    assert sorted(p.tolist()) == list(range(n))
    assert np.array_equal(p, Permutation(n, (5, 1))(x))  # deterministic
    if n > 16:
        assert not np.array_equal(p, Permutation(n, (5, 2))(x))  # keyed
        assert not np.array_equal(p, x)


def test_epoch_order_draws_each_source_its_count():
    """Source 0 (10 records) drawn 25 times: twice whole, then 5 of a third permutation; source
    1 (40 records) subsampled to 7; each repetition a different permutation."""
    order = EpochOrder(counts=[25, 7], sizes=[10, 40], offsets=[0, 10], seed=3, epoch=1,
                       shuffle=True)  # fmt: skip
    ids = order[np.arange(len(order))]
    assert len(ids) == 32
    first = np.bincount(ids[ids < 10], minlength=10)
    assert first.sum() == 25 and set(first.tolist()) <= {2, 3}
    second = ids[ids >= 10]
    assert len(second) == 7 and len(set(second.tolist())) == 7
    plain = EpochOrder(counts=[10, 40], sizes=[10, 40], offsets=[0, 10], seed=3, epoch=1,
                       shuffle=False)  # fmt: skip
    assert plain[np.arange(50)].tolist() == list(range(50))


def _explicit(order: np.ndarray, layers, rank: int, world: int) -> np.ndarray:
    """The materialised definition the on-demand part must equal."""
    remaining = order
    for layer in layers:
        w, cursors = layer["world_size"], np.asarray(layer["cursors"])
        idx = np.arange(len(remaining))
        remaining = remaining[(idx // w) >= cursors[idx % w]]
    return remaining[rank::world]


@pytest.mark.parametrize("seed", range(6))
def test_rank_part_after_layers_equals_the_explicit_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    order = EpochOrder([n], [n], [0], seed=seed, epoch=0, shuffle=True)
    full = order[np.arange(n)]
    layers = []
    for _ in range(int(rng.integers(0, 3))):
        w = int(rng.integers(1, 5))
        base = int(rng.integers(0, n // (3 * w) + 1))
        layers.append({"world_size": w, "cursors": (base + rng.integers(0, 4, w)).tolist()})
    world = int(rng.integers(1, 4))
    for rank in range(world):
        part = RankPart(order, layers, rank, world)
        want = _explicit(full, layers, rank, world)
        assert len(part) == len(want)
        assert [part[i] for i in range(len(part))] == want.tolist()


def test_a_billion_records_cost_no_memory_per_record():
    """10⁹ records, 8 ranks, after a resume from 4: the old way materialised 8 GB per rank."""
    tracemalloc.start()  # numpy's allocations are traced too
    n = 10**9
    order = EpochOrder([n // 2, n // 2], [n // 2, n // 2], [0, n // 2], seed=1, epoch=7,
                       shuffle=True)  # fmt: skip
    layers = [{"world_size": 4, "cursors": [10**6, 10**6 + 3, 10**6 + 1, 10**6 + 2]}]
    part = RankPart(order, layers, rank=5, world_size=8)
    ids = [part[i] for i in (0, 1, 12345, 10**7, len(part) - 1)]
    assert all(0 <= i < n for i in ids) and len(set(ids)) == 5
    assert len(part) == -(-(n - 4 * 10**6 - 6 - 5) // 8)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert peak_mb < 16, peak_mb  # blocks of 4096 ids, not 10⁹
