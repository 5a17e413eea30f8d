"""The engine end to end on CPU: 2 ranks over gloo, ZeRO-3, fp32, real shards and entry point."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from engine_fixtures import (
    REPO,
    STRAIGHT_STEPS,
    engine_env,
    free_port,
    launch,
    launch_command,
    read_metrics,
    read_tensorboard,
    straight_overrides,
    straight_run,
    tiny_overrides,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(bundled_shards, tmp_path_factory):
    return straight_run(bundled_shards, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def resumed(bundled_shards, tmp_path_factory):
    """The same run, stopped after 3 steps (torchrun) and resumed from its run folder."""
    run_dir = tmp_path_factory.mktemp("runs") / "resumed"
    first = launch(straight_overrides(bundled_shards, run_dir, **{"schedule.stop_at_step": 3}))
    second = launch(straight_overrides(bundled_shards, run_dir))
    return run_dir, first, second


def test_resume_gives_identical_losses_at_every_step(straight, resumed):
    run_dir, _, second = resumed
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    a, b = read_metrics(straight), read_metrics(run_dir)
    assert [r["step"] for r in a] == list(range(STRAIGHT_STEPS))
    assert [r["step"] for r in b] == list(range(STRAIGHT_STEPS))
    for ra, rb in zip(a, b):
        for key in ("loss/total", "loss/lm", "loss/jepa", "jepa/cosine", "grad_norm", "lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    # the loss goes down at all
    assert a[-1]["loss/lm"] < a[0]["loss/lm"] - 0.3
    ea, eb = read_metrics(straight, "eval"), read_metrics(run_dir, "eval")
    assert [e["step"] for e in ea] == [e["step"] for e in eb] == [3, 6]
    assert ea == eb


def test_checkpoints_latest_pointer_and_state(straight):
    root = straight / "checkpoints"
    assert (root / "latest").read_text() == "step_000006"
    tags = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert tags == ["step_000003", "step_000006"]
    state = json.loads((root / "step_000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2 and state["skipped_steps"] == 0
    assert len(state["manifest_hash"]) == 64
    assert state["data_state"]["world_size"] == 2 and len(state["data_state"]["ranks"]) == 2
    assert state["config"]["schedule"]["train_steps"] == STRAIGHT_STEPS
    ds = state["ds_config"]
    assert ds["train_batch_size"] == 2 * 2 * 2 and ds["optimizer"]["params"]["torch_adam"] is True
    assert {p.name for p in (root / "step_000006" / "rng").iterdir()} == {"rank_0.pt", "rank_1.pt"}
    for name in (
        "config.json",
        "ds_config.json",
        "hf_config/config.json",
        "tokenizer/tokenizer.json",
    ):
        assert (straight / name).exists(), name


def test_tensorboard_scalars_present_and_finite(straight):
    scalars = read_tensorboard(straight)
    expected = {
        "loss/lm", "loss/jepa", "loss/total", "jepa/cosine", "lr", "grad_norm",
        "tokens_per_s/rank", "tokens_per_s/total", "tokens_per_s/lm", "tokens_per_s/jepa_extra",
        "memory/max_rss_gib", "data_wait_share", "data/truncated_share",
        "data/skipped_overlong_share", "data/jepa_dropped_share", "data/non_padding_share",
        "skipped_steps", "eval/loss_lm", "eval/loss_jepa", "eval/cosine", "repr/cosine",
        "repr/effective_rank",
    }  # fmt: skip
    assert expected <= set(scalars), expected - set(scalars)
    assert "mfu" not in scalars  # no peak FLOP/s on CPU
    for tag in expected:
        assert scalars[tag] and all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert [s for s, _ in scalars["loss/total"]] == list(range(STRAIGHT_STEPS))
    assert [s for s, _ in scalars["repr/effective_rank"]] == [3, 6]
    assert all(1.0 <= v <= 64 for _, v in scalars["repr/effective_rank"])  # hidden size 64
    tps = dict(scalars["tokens_per_s/total"])
    assert all(tps[s] > dict(scalars["tokens_per_s/rank"])[s] for s in tps)  # 2 ranks
    lm, extra = dict(scalars["tokens_per_s/lm"]), dict(scalars["tokens_per_s/jepa_extra"])
    for s in tps:  # the split adds up (TensorBoard stores float32)
        assert extra[s] > 0 and abs(lm[s] + extra[s] - tps[s]) <= 1e-5 * tps[s]


def test_changed_dataset_is_refused(straight, bundled_shards, tmp_path, tokenizer_dir):
    from conftest import BUNDLED

    from data_pipeline.preprocess import preprocess

    other = tmp_path / "other"
    src = tmp_path / "small.jsonl"
    src.write_text("\n".join((BUNDLED / "test.jsonl").read_text().splitlines()[:400]) + "\n")
    preprocess(str(src), "messages", str(tokenizer_dir), str(other), num_workers=1,
               val_fraction=0.1, progress=False)  # fmt: skip
    run_dir = tmp_path / "copy"
    shutil.copytree(straight, run_dir)
    more = {"schedule.train_steps": STRAIGHT_STEPS + 1}
    proc = launch(tiny_overrides(other, run_dir, **more), nproc=1, launcher="python", check=False)
    assert proc.returncode != 0
    assert "dataset changed" in proc.stderr and "checkpoint.allow_data_change=true" in proc.stderr


def test_nonfinite_steps_are_skipped_then_the_run_stops(bundled_shards, tmp_path):
    """Plain `python` (world size 1). lr=1e30 makes step 0 blow the weights up; from step 1 on
    the gradient is non-finite: steps are skipped, and after 2 in a row the run stops with a message.
    Nothing is saved: no checkpoint holds the weights from before the blow-up."""
    run_dir = tmp_path / "nan"
    over = tiny_overrides(bundled_shards, run_dir, **{
        "optim.lr": "1e30", "schedule.warmup_steps": 0, "schedule.train_steps": 10,
        "schedule.kind": "constant", "optim.max_nonfinite_steps": 2,
        "logging.eval_every_steps": 0,
    })  # fmt: skip
    proc = launch(over, nproc=1, launcher="python", check=False)
    assert proc.returncode != 0, proc.stdout
    assert "2 bad steps in a row from step 1" in proc.stderr
    assert "no checkpoint was written before step 1: start over" in proc.stderr
    rows = read_metrics(run_dir)
    assert rows[-1]["skipped_steps"] == 2 and rows[-1]["step"] == 2
    assert not math.isfinite(rows[-1]["grad_norm"])  # huge weights: the gradient overflows
    assert not (run_dir / "checkpoints" / "latest").exists()


def test_a_blow_up_never_costs_the_last_good_checkpoint(bundled_shards, tmp_path):
    """The sequence that used to lose a run: a good run with checkpoints, then optim.lr=1e6 blows
    the weights up with finite gradients (a spike, then non-finite steps); the run stops naming
    the last good checkpoint and saves nothing; two more starts at lr=1e6 prune nothing; a start
    at the normal lr resumes from the good checkpoint and trains on."""
    run_dir = tmp_path / "spike"

    def run(steps: int, **extra) -> subprocess.CompletedProcess:
        over = tiny_overrides(bundled_shards, run_dir, **{
            "schedule.train_steps": steps, "schedule.kind": "constant", "schedule.warmup_steps": 0,
            "checkpoint.save_every_steps": 2, "checkpoint.keep_last": 2,
            "optim.max_nonfinite_steps": 3, "logging.eval_every_steps": 0, **extra,
        })  # fmt: skip
        return launch(over, nproc=1, launcher="python", check=False)

    assert run(12).returncode == 0  # 12 good steps: the spike detector's history
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_000010", "step_000012"]
    good = run_dir / "checkpoints" / "step_000012"
    for _ in range(3):  # the first stop, then two restarts
        proc = run(30, **{"optim.lr": "1e6"})
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"stopped without saving: the last good checkpoint is {good}" in proc.stderr
        # Step 12's update blew the weights up; the blown-up model's first loss can still pass
        # (here a uniform prediction: ln V, gradient 0), then every step is non-finite.
        assert re.search(r"bad steps in a row from step 1[34] ", proc.stderr), proc.stderr
        assert "a spike" in proc.stdout or "non-finite" in proc.stdout
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == kept
        assert (run_dir / "checkpoints" / "latest").read_text() == "step_000012"
    proc = run(16)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {good} at step 12" in proc.stdout
    rows = [r for r in read_metrics(run_dir) if r["step"] >= 12]
    assert rows[-1]["step"] == 15 and all(math.isfinite(r["loss/lm"]) for r in rows[-4:])
    assert rows[-1]["loss/lm"] < 10


def test_regularizer_readout_and_collapse_metrics_in_training(bundled_shards, tmp_path):
    """jepa.regularizer and jepa.readout=paper train; the collapse metrics are logged at every log
    step from the step's own embeddings; the warning fires once (here at a threshold every batch
    exceeds, to see it)."""
    run_dir = tmp_path / "reg"
    over = tiny_overrides(bundled_shards, run_dir, **{
        "schedule.train_steps": 6, "jepa.regularizer": "sigreg", "jepa.readout": "paper",
        "jepa.sigreg_slices": 32, "jepa.collapse_warning_cosine": -1, "logging.eval_every_steps": 0,
    })  # fmt: skip
    proc = launch(over, nproc=1, launcher="python")
    rows = read_metrics(run_dir)
    for r in rows:
        assert r["jepa/regularizer"] > 0 and math.isfinite(r["loss/total"])
        assert -1 <= r["jepa/cos_b_b"] <= 1 and -1 <= r["jepa/cos_pred_pred"] <= 1
        assert r["jepa/effective_rank_b"] >= 1
    assert proc.stdout.count("the view embeddings look collapsed: jepa/cos_b_b") == 1


def _shm_buffers(port: int) -> list[str]:
    """DeepSpeed's CPU all-reduce segments of a run on `port` (any rank)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_no_shared_memory_is_left_behind(bundled_shards, tmp_path):
    """DeepSpeed's CPU all-reduce op maps a 66 MB /dev/shm segment per rank and never removes it
    (it is used when all ranks are local and LOCAL_SIZE is set: under the deepspeed launcher, not
    torchrun); the ranks unlink theirs once every rank has mapped them. A clean exit and a kill -9
    of the whole run leave nothing behind (before: one segment per rank and launch)."""
    launcher = "deepspeed"
    port = free_port()
    over = tiny_overrides(bundled_shards, tmp_path / "clean", **{"schedule.train_steps": 2,
                                                                 "logging.eval_every_steps": 0})  # fmt: skip
    launch(over, launcher=launcher, port=port)
    assert _shm_buffers(port) == []

    port = free_port()
    run_dir = tmp_path / "killed"
    over = tiny_overrides(bundled_shards, run_dir, **{"schedule.train_steps": 100000,
                                                      "logging.eval_every_steps": 0})  # fmt: skip
    proc = subprocess.Popen(launch_command(over, 2, launcher, port), cwd=REPO, env=engine_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
            assert proc.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    time.sleep(1)  # the kernel frees unlinked segments as the last mapping goes
    assert _shm_buffers(port) == []


def test_a_jepa_run_whose_rows_hold_no_pairs_says_so(tokenizer_dir, tmp_path):
    """Rows shorter than the records: every record is truncated and loses its JEPA segments.
    Before: the run trained with no JEPA term and loss/jepa just went missing."""
    from conftest import chat, write_jsonl

    from data_pipeline.preprocess import preprocess

    long = " ".join(["lines containing the word dog"] * 6)
    src = write_jsonl(tmp_path / "long.jsonl", [chat(f"{long} {i}", ".*dog.*") for i in range(40)])
    shards = tmp_path / "shards"
    preprocess(str(src), "messages", str(tokenizer_dir), str(shards), num_workers=1,
               val_fraction=0.2, progress=False)  # fmt: skip
    run_dir = tmp_path / "run"
    proc = launch(tiny_overrides(shards, run_dir, **{"data.seq_len_tokens": 16,
                                                     "schedule.train_steps": 3,
                                                     "logging.eval_every_steps": 0}),
                  nproc=1, launcher="python")  # fmt: skip
    warnings = [ln for ln in proc.stdout.splitlines() if "packed no JEPA pairs" in ln]
    assert len(warnings) == 1 and "100% of records" in warnings[0], proc.stdout[-2000:]
    assert "data.seq_len_tokens=16" in warnings[0]
    rows = read_metrics(run_dir)
    assert all(
        r["data/jepa_dropped_share"] == 1.0 and r["data/truncated_share"] == 1.0 for r in rows
    )
    assert all("loss/jepa" not in r for r in rows)
    assert 0 < rows[-1]["data/non_padding_share"] <= 1.0


def test_thousands_of_shards_under_a_low_open_file_limit(tokenizer_dir, tmp_path):
    """5,000+ shard files, `ulimit -n 256`: every shard maps two files, so before the LRU of open
    shards (data_pipeline/shards.py, MAX_OPEN_READERS) the run died with `[Errno 24] Too many
    open files`."""
    import resource

    from data_pipeline.preprocess import preprocess

    lines = (REPO / "data" / "nlrx_synth" / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "in.jsonl").write_text("".join(lines[:5200]))
    shards = tmp_path / "many"
    preprocess(str(tmp_path / "in.jsonl"), "messages", str(tokenizer_dir), str(shards),
               num_workers=2, shard_bytes=420, val_fraction=0.05, progress=False)  # fmt: skip
    assert len(list((shards / "shards").glob("*.bin"))) >= 5000

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    over = tiny_overrides(shards, tmp_path / "run", **{"schedule.train_steps": 12,
                                                         "logging.eval_every_steps": 6})  # fmt: skip
    cmd = launch_command(over, 1, "python", free_port())
    proc = subprocess.run(cmd, cwd=REPO, env=engine_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=low_limit)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "run")[-1]["step"] == 11
