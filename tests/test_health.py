"""pretrain/health.py: which steps are bad (non-finite, spikes), and the streak that stops a run."""

from __future__ import annotations

import math

from pretrain.health import MIN_HISTORY, LossWatch


def test_spike_needs_history_then_is_caught():
    w = LossWatch(spike_factor=4.0, window=50, max_bad=3)
    assert w.observe(0, 100.0, True) is None  # no history yet: not judged a spike
    for step in range(1, MIN_HISTORY + 1):
        assert w.observe(step, 2.0, True) is None
    why = w.observe(20, 100.0, True)
    assert why is not None and "spike" in why and w.streak == 1 and w.streak_start == 20
    assert w.observe(21, 7.9, True) is None  # under 4 × the mean of good steps only (≈ 10.9)
    assert w.streak == 0 and w.streak_start is None


def test_streak_counts_non_finite_and_spikes_and_stops():
    w = LossWatch(spike_factor=4.0, window=5, max_bad=3)
    for step in range(MIN_HISTORY):
        w.observe(step, 3.0, True)
    assert "non-finite" in w.observe(10, math.nan, True)
    assert "non-finite" in w.observe(11, 3.0, False)  # the update was skipped
    assert not w.stop
    assert "spike" in w.observe(12, 1e9, True)
    assert w.stop and w.streak_start == 10


def test_factor_zero_catches_only_non_finite():
    w = LossWatch(spike_factor=0, window=5, max_bad=1)
    for step in range(MIN_HISTORY):
        w.observe(step, 1.0, True)
    assert w.observe(10, 1e30, True) is None
    assert w.observe(11, math.inf, True) is not None and w.stop
