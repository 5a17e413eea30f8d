"""One live run per run folder: a second run is refused in one line; the lock of a run that is
gone (kill -9, requeue, a dead node) is taken over, saying so."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from engine_fixtures import (
    REPO,
    engine_env,
    free_port,
    launch,
    launch_command,
    read_metrics,
    tiny_overrides,
)

from pretrain.rundir import LOCK_NAME, RunDirBusyError, RunDirLock


def _plant(run_dir, age_s: float = 0.0, **owner) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    held = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "",
            "started": "2026-11-30T00:00:00", **owner}  # fmt: skip
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(held))
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_lock_is_exclusive_and_released(tmp_path):
    a = RunDirLock(tmp_path)
    assert a.acquire() is None
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path, pid=sleeper.pid)
        with pytest.raises(RunDirBusyError, match=rf"{tmp_path} is in use by pid {sleeper.pid}"):
            RunDirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    _plant(tmp_path)  # this process: a second engine in one process may take its own lock
    second = RunDirLock(tmp_path)
    assert second.acquire() is None
    a.release()
    assert (tmp_path / LOCK_NAME).exists()  # the record is second's now: not a's to remove
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_live_process_on_this_host_is_respected(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path, age_s=3600, pid=sleeper.pid)  # an old heartbeat does not matter here
        with pytest.raises(RunDirBusyError, match=f"pid {sleeper.pid}"):
            RunDirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunDirLock(tmp_path)
    note = lock.acquire()  # now the process is gone
    assert (
        note and f"took over the lock of pid {sleeper.pid}" in note and "no longer exists" in note
    )
    lock.release()


def test_lock_on_another_host_is_stale_only_without_heartbeat(tmp_path):
    _plant(tmp_path, age_s=10, host="node-17", pid=1234, slurm_job_id="77")
    with pytest.raises(RunDirBusyError, match=r"pid 1234 on node-17 \(Slurm job 77\)"):
        RunDirLock(tmp_path, stale_after_s=60).acquire()
    _plant(tmp_path, age_s=120, host="node-17", pid=1234, slurm_job_id="77")
    lock = RunDirLock(tmp_path, stale_after_s=60)
    assert "no heartbeat for 120 s" in lock.acquire()
    lock.release()


def test_a_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _plant(tmp_path, age_s=5, host="node-3", pid=99, slurm_job_id="4242")
    lock = RunDirLock(tmp_path)
    assert "the same Slurm job, requeued" in lock.acquire()
    lock.release()


@pytest.mark.slow
def test_a_second_run_on_a_live_run_dir_is_refused_and_a_killed_run_is_taken_over(
    bundled_shards, tmp_path
):
    """Before: both runs resumed and wrote interleaved checkpoints and metrics into one folder."""
    run_dir = tmp_path / "run"
    long = tiny_overrides(bundled_shards, run_dir, **{"schedule.train_steps": 100000,
                                                      "logging.eval_every_steps": 0})  # fmt: skip
    first = subprocess.Popen(launch_command(long, 1, "python", free_port()), cwd=REPO,
                             env=engine_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        second = launch(tiny_overrides(bundled_shards, run_dir), check=False)  # 2 ranks
        assert second.returncode != 0
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert errors and all(f"{run_dir} is in use by pid {first.pid}" in e for e in errors)
        # each rank: one line, no traceback (torchrun adds its own report of a failed child)
        assert len(errors) >= 1 and 'File "/work/main/pretrain' not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    # one process, as the first run (a checkpoint it wrote resumes at the same world size)
    third = launch(tiny_overrides(bundled_shards, run_dir, **{"logging.eval_every_steps": 0}),
                   nproc=1, launcher="python")  # fmt: skip
    assert f"took over the lock of pid {first.pid} on {socket.gethostname()}" in third.stdout
    assert "that process no longer exists" in third.stdout
    assert not (run_dir / LOCK_NAME).exists()  # released at the end
