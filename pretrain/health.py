"""Which steps are bad, and so which checkpoint is the last good one.

A step is bad when DeepSpeed skipped its update (a non-finite loss or gradient) or when its LM loss
is over `spike_factor` × the mean LM loss of the last `window` good steps (a spike: an update with
finite gradients can still blow the weights up, after which every step is bad). A checkpoint
saved before step c holds the weights step c starts from, so it is good if step c is good.

    watch = LossWatch(spike_factor=4.0, window=50, max_bad=5)
    for step, lm_loss, applied in steps:
        verdict = watch.observe(step, lm_loss, applied)   # None, "non-finite" or "spike …"
        if watch.streak >= watch.max_bad: stop, naming the newest good checkpoint before
                                          watch.streak_start
"""

from __future__ import annotations

import math
from collections import deque

# Spike detection waits for this many good steps: the first losses fall fast from ln(vocab).
MIN_HISTORY = 10


class LossWatch:
    def __init__(self, spike_factor: float, window: int, max_bad: int):
        self.spike_factor, self.max_bad = spike_factor, max_bad
        self.recent: deque[float] = deque(maxlen=window)
        self.streak = 0
        self.streak_start: int | None = None

    def mean(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else math.nan

    def verdict(self, lm_loss: float, applied: bool) -> str | None:
        """Why a step with this LM loss is bad, or None if it is good."""
        if not applied or not math.isfinite(lm_loss):
            return "non-finite loss or gradient, update skipped"
        if self.spike_factor > 0 and len(self.recent) >= min(MIN_HISTORY, self.recent.maxlen):
            limit = self.spike_factor * self.mean()
            if lm_loss > limit:
                return (f"LM loss {lm_loss:.4g} over {self.spike_factor:g} × the mean of the last "
                        f"{len(self.recent)} good steps ({self.mean():.4g}): a spike")  # fmt: skip
        return None

    def observe(self, step: int, lm_loss: float, applied: bool) -> str | None:
        """Records step `step`; returns why it is bad, or None."""
        why = self.verdict(lm_loss, applied)
        if why is None:
            self.recent.append(lm_loss)
            self.streak, self.streak_start = 0, None
        else:
            if self.streak == 0:
                self.streak_start = step
            self.streak += 1
        return why

    @property
    def stop(self) -> bool:
        return self.streak >= self.max_bad
