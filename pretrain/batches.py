"""The input side of a step: which rows it builds, its micro-batches packed ahead in a thread.

    inputs = StepInputs(train_ds, cfg, start_step, pin=on_cuda)
    step_in = inputs.next()          # StepInput of the next step (blocks only if not ready)
    ...
    inputs.consumed_state            # dataset position after the last step handed out

A background thread packs the micro-batches of the next `data.prefetch_steps` steps while the
current one computes (packing is numpy work that releases the GIL for most of its time), adds the
host-side indices the objective reads (`objective.add_label_index`), counts the step's tokens, and
on CUDA copies the batch into pinned memory so that the host-to-device copy is asynchronous.
A checkpoint records `consumed_state`, the position after the batches handed out, never the
prefetched ones: resume stays bit-exact.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.packing import PackStats
from pretrain.config import TrainConfig
from pretrain.metrics import BatchWork, batch_work
from pretrain.objective import HOST_KEYS, add_label_index, batch_counts


def jepa_rows_at(cfg: TrainConfig, step: int) -> bool:
    """Whether step `step` builds JEPA segments. Loss dropout draws from an RNG seeded by
    (seed, step): identical on all ranks and across resumes, with no state to save."""
    if cfg.jepa.objective != "jepa":
        return False
    if cfg.jepa.loss_dropout <= 0:
        return True
    return bool(np.random.default_rng([cfg.seed, step, 7]).random() >= cfg.jepa.loss_dropout)


@dataclass
class StepInput:
    """Everything a step needs from the data, built on the host."""

    step: int
    with_jepa: bool
    micro: list[dict[str, torch.Tensor]]
    """Micro-batches as CPU tensors (pinned on CUDA), see `to_device`."""
    counts: np.ndarray
    """(2,) float64: this rank's LM loss tokens and JEPA pairs | STP triples."""
    work: BatchWork
    """Tokens (LM, JEPA-extra), labelled positions and attended pairs of this rank's rows."""
    data_state: dict
    """This rank's dataset position after these micro-batches."""
    pack_stats: PackStats
    """This rank's packing statistics so far (records truncated, skipped, JEPA dropped, …)."""


def build_step_input(ds, cfg: TrainConfig, step: int, with_jepa: bool, pin: bool) -> StepInput:
    """Packs the step's micro-batches from ds (advancing it) on the calling thread."""
    micro, counts, work = [], np.zeros(2), BatchWork()
    for _ in range(cfg.data.grad_accum_steps):
        host = add_label_index(ds.next_batch(cfg.data.micro_batch_rows, with_jepa))
        counts += batch_counts(host, cfg.jepa, with_jepa)
        work = work + batch_work(host)
        micro.append(as_tensors(host, pin))
    state = copy.deepcopy(ds.state_dict())
    stats = dataclasses.replace(ds.stats)
    return StepInput(step, with_jepa, micro, counts, work, state, stats)


def as_tensors(batch: dict[str, np.ndarray], pin: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.pin_memory() if pin and k not in HOST_KEYS else t
    return out


def to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors → dev; asynchronous from pinned memory. HOST_KEYS stay on the host."""
    return {
        k: t if k in HOST_KEYS else t.to(dev, non_blocking=t.is_pinned()) for k, t in batch.items()
    }


class StepInputs:
    """StepInput of steps start, start + 1, …, packed `prefetch` steps ahead by a thread (or on
    the caller's thread when prefetch is 0). `with_jepa_at(step)` decides each step's rows."""

    def __init__(
        self,
        ds,
        cfg: TrainConfig,
        start_step: int,
        pin: bool = False,
        with_jepa_at: Callable[[int], bool] | None = None,
    ):
        self.ds, self.cfg, self.pin = ds, cfg, pin
        self.with_jepa_at = with_jepa_at or (lambda step: jepa_rows_at(cfg, step))
        self.next_step = start_step
        self.consumed_state = copy.deepcopy(ds.state_dict())
        self.wait_s = 0.0  # the caller's wait for the last StepInput
        self._prefetch = cfg.data.prefetch_steps
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self._prefetch))
        self._stop = threading.Event()
        self._thread = None
        if self._prefetch > 0:
            self._thread = threading.Thread(
                target=self._produce, args=(start_step,), name="step-inputs", daemon=True
            )
            self._thread.start()

    def _produce(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                self._put(
                    build_step_input(self.ds, self.cfg, step, self.with_jepa_at(step), self.pin)
                )
                step += 1
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def _put(self, item) -> None:
        """Waits for room in the queue, unless the consumer has closed it."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> StepInput:
        t0 = time.perf_counter()
        if self._thread is None:
            item = build_step_input(
                self.ds, self.cfg, self.next_step, self.with_jepa_at(self.next_step), self.pin
            )
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
        self.wait_s = time.perf_counter() - t0
        assert item.step == self.next_step, (item.step, self.next_step)
        self.next_step += 1
        self.consumed_state = item.data_state
        return item

    def close(self) -> None:
        """Stops the thread (it may be blocked on a full queue); the dataset is then free."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
