"""The step inputs: packed ahead in a thread exactly as on the main thread, with the dataset
position of the consumed (not the prefetched) batches; errors in the thread reach the caller."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.dataset import PackedDataset
from pretrain.batches import StepInputs, jepa_rows_at
from pretrain.config import TrainConfig, config_from_dict
from pretrain.metrics import batch_work


def _cfg(prefetch: int, **jepa) -> TrainConfig:
    return config_from_dict({
        "data": {"seq_len_tokens": 128, "micro_batch_rows": 2, "grad_accum_steps": 3,
                 "prefetch_steps": prefetch},
        "jepa": {"loss_dropout": 0.5, **jepa},
    })  # fmt: skip


def _ds(shards) -> PackedDataset:
    return PackedDataset(shards, seq_len=128, predictor_tokens=1, seed=3)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetched_steps_equal_main_thread_steps(bundled_shards, prefetch):
    inline = StepInputs(_ds(bundled_shards), _cfg(0), start_step=5)
    ahead = StepInputs(_ds(bundled_shards), _cfg(prefetch), start_step=5)
    try:
        for step in range(5, 11):
            a, b = inline.next(), ahead.next()
            assert a.step == b.step == step
            assert a.with_jepa == b.with_jepa == jepa_rows_at(_cfg(0), step)
            assert len(a.micro) == 3 and all(_same(x, y) for x, y in zip(a.micro, b.micro))
            assert np.array_equal(a.counts, b.counts) and a.work == b.work
            # the position handed out is that of the consumed batches, not of the thread's
            assert ahead.consumed_state == inline.consumed_state == a.data_state
            assert "label_index" in a.micro[0] and a.counts[0] == len(
                a.micro[0]["label_index"]
            ) + len(a.micro[1]["label_index"]) + len(a.micro[2]["label_index"])
    finally:
        ahead.close()


def test_checkpointed_position_resumes_the_same_stream(bundled_shards):
    """Save consumed_state while the thread is ahead; a new dataset loaded from it continues
    with the batches that came next."""
    ahead = StepInputs(_ds(bundled_shards), _cfg(2), start_step=0)
    for _ in range(3):
        ahead.next()
    saved = PackedDataset.merge_states([ahead.consumed_state])
    expected = [ahead.next() for _ in range(2)]
    ahead.close()
    ds = _ds(bundled_shards)
    ds.load_state_dict(saved)
    resumed = StepInputs(ds, _cfg(0), start_step=3)
    for want in expected:
        got = resumed.next()
        assert all(_same(x, y) for x, y in zip(got.micro, want.micro))


def test_counts_and_work_of_a_step(bundled_shards):
    inputs = StepInputs(_ds(bundled_shards), _cfg(0, loss_dropout=0.0), start_step=0)
    step = inputs.next()
    assert step.with_jepa
    n_pairs = sum(len(m["pred_index"]) for m in step.micro)
    assert step.counts[1] == n_pairs > 0
    tokens = sum(int((m["segment_ids"] > 0).sum()) for m in step.micro)
    assert step.work.tokens == tokens and step.work.jepa_extra_tokens > 0
    assert step.work == sum(
        (batch_work({k: v.numpy() for k, v in m.items()}) for m in step.micro[1:]),
        batch_work({k: v.numpy() for k, v in step.micro[0].items()}),
    )


def test_an_error_in_the_thread_is_raised_by_next(bundled_shards):
    class Broken:
        def state_dict(self):
            return {}

        def next_batch(self, rows, with_jepa):
            raise ValueError("shard u.train.bin: bad record 12")

    inputs = StepInputs(Broken(), _cfg(1), start_step=0)
    with pytest.raises(ValueError, match="bad record 12"):
        inputs.next()
    inputs.close()
