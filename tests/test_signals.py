"""Stopping a run from outside: a signal to the command a user started reaches the ranks, which
save a checkpoint and exit 75, and the command returns only once the checkpoint is on disk
(README, "Signals"). Also: a stop requested before the first step, and a user error printed once."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from engine_fixtures import REPO, engine_env, free_port, launch, launch_command, tiny_overrides

from pretrain import checkpoint as ckpt
from pretrain.preemption import PREEMPT_EXIT_CODE


def long_run(shards: Path, run_dir: Path) -> list[str]:
    """A run far longer than the test: it only ends by being stopped."""
    return tiny_overrides(
        shards, run_dir, **{"schedule.train_steps": 100000, "checkpoint.save_every_steps": 0,
                            "checkpoint.preempt_check_every_steps": 2, "logging.eval_every_steps": 0}
    )  # fmt: skip


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=engine_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_steps(
    proc: subprocess.Popen, run_dir: Path, steps: int, timeout_s: float = 240
) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {steps} steps in {timeout_s} s: {proc.communicate()}")


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The processes running pretrain/main.py below `proc` (not DeepSpeed's launch process)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    return [k for k in kids if any(a.endswith("main.py") for a in k.cmdline()[:3])]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_launch_command_checkpoints_and_returns_75(bundled_shards, tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = start(launch_command(long_run(bundled_shards, run_dir), 2, "launch", free_port()))
    wait_for_steps(proc, run_dir, 3)
    ranks = ranks_of(proc)
    assert len(ranks) == 2
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    # Returned only now, with the checkpoint complete on disk and no rank left behind.
    assert proc.returncode == PREEMPT_EXIT_CODE, (out, err)
    latest = ckpt.find_latest(run_dir)
    assert latest is not None and (latest / "trainer_state.json").exists()
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)
    assert f"stop requested ({sig.name})" in out
    assert f"saved, exiting with {PREEMPT_EXIT_CODE}" in out
    # The run resumes from it: the next launch starts where this one stopped.
    step = int(latest.name.split("_")[-1])
    res = launch(tiny_overrides(bundled_shards, run_dir, **{"schedule.train_steps": step + 2}),
                 launcher="launch")  # fmt: skip
    assert f"resumed from {latest} at step {step}" in res.stdout


def test_sigterm_to_the_deepspeed_runner_stops_its_ranks_with_a_checkpoint(
    bundled_shards, tmp_path
):
    """DeepSpeed's runner dies of SIGTERM at once without telling anyone (its code); the ranks
    notice it is gone at their next stop check, save and exit instead of running to the end."""
    run_dir = tmp_path / "run"
    proc = start(launch_command(long_run(bundled_shards, run_dir), 2, "deepspeed", free_port()))
    wait_for_steps(proc, run_dir, 3)
    ranks = ranks_of(proc)
    assert len(ranks) == 2
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive
    latest = ckpt.find_latest(run_dir)
    assert latest is not None and (latest / "trainer_state.json").exists()


def test_stop_requested_before_the_first_step(bundled_shards, tmp_path):
    """SIGTERM to rank 0 while it waits for rank 1 to join: both ranks set up, agree to stop and
    exit 75 before the first step, writing no checkpoint."""
    run_dir, port = tmp_path / "run", str(free_port())
    cmd = [sys.executable, str(REPO / "pretrain" / "main.py"), str(REPO / "recipes" / "tiny_cpu.yaml"),
           *long_run(bundled_shards, run_dir)]  # fmt: skip

    def rank(r: int) -> subprocess.Popen:
        env = {**engine_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    r0 = rank(0)
    time.sleep(8)  # imports done, the handler installed, waiting for rank 1 at the rendezvous
    assert r0.poll() is None
    r0.send_signal(signal.SIGTERM)
    r1 = rank(1)
    out0, err0 = r0.communicate(timeout=180)
    out1, err1 = r1.communicate(timeout=60)
    assert (r0.returncode, r1.returncode) == (PREEMPT_EXIT_CODE, PREEMPT_EXIT_CODE), (err0, err1)
    assert "stop requested during the setup: no step taken" in out0
    assert ckpt.find_latest(run_dir) is None
    assert (run_dir / "metrics.jsonl").read_text() == ""  # no step logged


@pytest.mark.parametrize(
    "launcher,error",
    [("launch", "shard"), ("deepspeed", "data"), ("torchrun", "data"), ("deepspeed", "config")],
)
def test_a_user_error_is_printed_once_per_launcher(bundled_shards, tmp_path, launcher, error):
    """Before: once per rank under every launcher. "shard": a damaged shard that only rank 1
    checks (the start-up checks are shared among the ranks): rank 0 raises the same line."""
    if error == "shard":
        folder = shutil.copytree(bundled_shards, tmp_path / "shards")
        victim = folder / "shards" / "00001.train.idx"  # the 2nd shard: rank 1's share of 2
        victim.write_bytes(victim.read_bytes()[:-2])
    bad = {"data": f"data.paths=[{tmp_path / 'missing'}]", "shard": f"data.paths=[{tmp_path / 'shards'}]",
           "config": f"deepspeed_config={tmp_path / 'missing.json'}"}[error]  # fmt: skip
    res = launch([bad, f"run_dir={tmp_path / 'run'}"], launcher=launcher, check=False)
    assert res.returncode == (1 if launcher == "torchrun" else 2), (
        res.stderr
    )  # torchrun: any failure is 1
    errors = [line for line in res.stderr.splitlines() if "error: " in line]
    named = "00001.train.idx: size" if error == "shard" else "missing"
    assert len(errors) == 1 and named in errors[0], res.stderr
    if (
        launcher != "torchrun"
    ):  # torchrun prints its own traceback (ChildFailedError) for any failure
        assert "Traceback" not in res.stderr
