"""The sbatch templates on a real Slurm: slurmctld + two slurmd on this machine (scripts/local_slurm.py).

Every job goes through `sbatch` and is watched with `squeue` / `scontrol` / `sacct -c`, as a user
would. Skipped, with the reason, only where Slurm cannot run (no root, no apt-get).
"""

from __future__ import annotations

import filecmp
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import BUNDLED, run_module
from engine_fixtures import engine_env, read_metrics, read_tensorboard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from local_slurm import LocalSlurm, SlurmUnavailable  # noqa: E402

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}  # fmt: skip
# The training loop stops on a preemption signal only once pretrain/trainer.py calls
# preemption.install_handler() and preemption.stop_requested() (slurm/README.md, "Preemption").
TRAIN_STEPS = 60  # ~0.1 s a step on 2 CPU cores: the run is short, the startup dominates
SAVE_EVERY = 20
PREEMPT_CHECK = 4  # ranks agree on a stop request every 4 steps


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        pytest.skip(f"Slurm cannot run here: {e}")
    yield c
    c.stop()


def job_env(cluster: LocalSlurm, **extra: str) -> dict[str, str]:
    """The tests' environment for the jobs, with this interpreter's bin/ (deepspeed) at the END
    of PATH instead of activating the venv: DeepSpeed's JIT-built op in TORCH_EXTENSIONS_DIR is
    shared with the other engine tests, and a different `ninja` first in PATH (the venv's 1.13
    against the system's 1.11: they hash commands differently) would rebuild it (~70 s)."""
    env = cluster.env(engine_env())
    env["PATH"] = f"{env.get('PATH', '')}{os.pathsep}{Path(sys.executable).parent}"
    env.update(VENV="", PYTHON=sys.executable, **extra)
    return env


def sbatch(cluster: LocalSlurm, *args: str, env: dict[str, str] | None = None) -> str:
    proc = cluster.run(
        "sbatch", "--parsable", *map(str, args), cwd=REPO, env=env or job_env(cluster)
    )
    return proc.stdout.strip().split(";")[0]


def job_records(cluster: LocalSlurm, job: str) -> list[dict[str, str]]:
    """`scontrol show job -o JOB` as dicts: one per array task, one for a plain job."""
    out = cluster.run("scontrol", "show", "job", "-o", job, timeout=20).stdout
    recs = []
    for line in out.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        recs.append(fields)
    return recs


def wait_job(
    cluster: LocalSlurm, job: str, timeout_s: float, log: Path | None = None
) -> list[dict[str, str]]:
    """Polls until every task of `job` reached a terminal state (a requeued job passes through
    PENDING again and is waited for)."""
    deadline, recs = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        recs = job_records(cluster, job)
        if recs and all(r["JobState"] in TERMINAL for r in recs):
            return recs
        time.sleep(1)
    cluster.run("scancel", job, check=False)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"job {job} not finished after {timeout_s:.0f} s: {recs}\n{tail}")


def sacct_states(cluster: LocalSlurm, job: str) -> list[tuple[str, str]]:
    """(State, ExitCode) of every completion of `job` in the job completion log (sacct -c)."""
    out = cluster.run(
        "sacct", "-c", "-j", job, "-n", "-P", "-o", "JobID,State,ExitCode", check=False
    ).stdout
    return [tuple(line.split("|")[1:3]) for line in out.splitlines() if line.split("|")[0] == job]


def squeue_state(cluster: LocalSlurm, job: str) -> str:
    return cluster.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%T").stdout.strip()


# ------------------------------------------------------------------------------------------------
# 1. Preprocessing array


def test_preprocess_array_matches_one_local_run(cluster, tokenizer_dir, tmp_path):
    args = ["--inputs", BUNDLED / "train.jsonl", "--views", "messages", "--tokenizer", tokenizer_dir,
            "--shard_bytes", 300_000, "--val_fraction", 0.05]  # fmt: skip
    local, arrayed = tmp_path / "local", tmp_path / "array"
    run_module("data_pipeline.preprocess", *args, "--out", local, "--num_workers", 1)
    name = f"prep-{tmp_path.name}"
    env = job_env(cluster, FINAL_LOG=str(tmp_path / "final.log"))
    job = sbatch(cluster, "--array=0-1", f"--job-name={name}", f"--output={tmp_path}/task-%a.log",
                 "slurm/preprocess.sh", *args, "--out", arrayed, env=env)  # fmt: skip
    tasks = wait_job(cluster, job, 120, tmp_path / "task-0.log")
    assert sorted(r["ArrayTaskId"] for r in tasks) == ["0", "1"]
    assert all(r["JobState"] == "COMPLETED" for r in tasks), tasks
    logs = [(tmp_path / f"task-{i}.log").read_text() for i in range(2)]
    assert "task 0 of 2" in logs[0] and "task 1 of 2" in logs[1]

    # The final job (submitted by task 0, afterok on the array) writes the manifest and verifies.
    listed = cluster.run(
        "squeue", "-h", "-t", "all", "-n", f"{name}-final", "-o", "%i"
    ).stdout.split()
    assert len(listed) == 1, listed
    (final,) = wait_job(cluster, listed[0], 60, tmp_path / "final.log")
    assert final["JobState"] == "COMPLETED"
    assert f"final job (manifest + verify): {listed[0]}, after array job {job}" in logs[0]
    assert sacct_states(cluster, listed[0]) == [("COMPLETED", "0:0")]
    assert (tmp_path / "final.log").read_text().splitlines()[-1].startswith(f"OK {arrayed}")

    assert (arrayed / "manifest.json").read_bytes() == (local / "manifest.json").read_bytes()
    names = sorted(p.name for p in (local / "shards").iterdir())
    assert names == sorted(p.name for p in (arrayed / "shards").iterdir()) and len(names) > 8
    match, mismatch, errors = filecmp.cmpfiles(
        local / "shards", arrayed / "shards", names, shallow=False
    )
    assert mismatch == [] and errors == [] and len(match) == len(names)


# ------------------------------------------------------------------------------------------------
# 2-4. Pretraining


def train_overrides(shards: Path, run_dir: Path) -> list[str]:
    """The tiny CPU recipe, a few dozen steps, every step logged, no eval."""
    return [f"data.paths=[{shards}]", f"run_dir={run_dir}", "data.seq_len_tokens=128",
            "data.micro_batch_rows=2", "logging.log_every_steps=1", "logging.eval_every_steps=0",
            "logging.progress_bar=false", "schedule.warmup_steps=2",
            f"schedule.train_steps={TRAIN_STEPS}", f"checkpoint.save_every_steps={SAVE_EVERY}",
            "checkpoint.keep_last=3", f"checkpoint.preempt_check_every_steps={PREEMPT_CHECK}"]  # fmt: skip


def submit_pretrain(cluster: LocalSlurm, shards: Path, run_dir: Path, **env: str) -> str:
    return sbatch(cluster, "--nodes=2", f"--output={run_dir.parent}/{run_dir.name}.slurm-%j.out",
                  "slurm/pretrain.sh", "recipes/tiny_cpu.yaml", *train_overrides(shards, run_dir),
                  env=job_env(cluster, STEP_WAIT_S="20", **env))  # fmt: skip


def slurm_out(run_dir: Path, job: str) -> Path:
    return run_dir.parent / f"{run_dir.name}.slurm-{job}.out"


def rank_logs(run_dir: Path) -> str:
    return "\n".join(
        f"== {p}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("logs/*/*rank*.log"))
    )


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss/total}; where a step was logged twice (a resumed run), the last one."""
    return {r["step"]: r["loss/total"] for r in read_metrics(run_dir)}


def wait_for_step(run_dir: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=-1) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"{run_dir} did not reach step {step} in {timeout_s:.0f} s\n{rank_logs(run_dir)}"
    )


@pytest.fixture(scope="module")
def reference_run(cluster, bundled_shards, tmp_path_factory) -> tuple[str, Path]:
    """An uninterrupted 2-node run: test 2 checks it, tests 3 and 4 compare their losses with it."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "reference"
    job = submit_pretrain(cluster, bundled_shards, run_dir)
    wait_job(cluster, job, 240, slurm_out(run_dir, job))
    return job, run_dir


def test_two_node_pretraining_job(cluster, reference_run):
    job, run_dir = reference_run
    (rec,) = job_records(cluster, job)
    out = slurm_out(run_dir, job).read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", out + rank_logs(run_dir)
    assert sacct_states(cluster, job) == [("COMPLETED", "0:0")]
    assert rec["NumNodes"] == "2" and rec["NodeList"] == "slurmnode[1-2]"
    assert "2 node(s) slurmnode1 slurmnode2, 1 rank(s) each, master slurmnode1:" in out
    # One launcher per node, one rank each, world size 2.
    logs = run_dir / "logs" / f"job_{job}"
    assert sorted(p.name for p in logs.glob("launcher.node*.log")) == [
        "launcher.node0.log",
        "launcher.node1.log",
    ]
    assert len(list(logs.glob("*_rank0.log"))) == 1 and len(list(logs.glob("*_rank1.log"))) == 1
    assert (logs / "hostfile").read_text() == "slurmnode1 slots=1\nslurmnode2 slots=1\n"
    assert "world size 2" in next(logs.glob("*_rank0.log")).read_text()
    assert "job.log" in os.listdir(logs)

    steps = losses(run_dir)
    assert sorted(steps) == list(range(TRAIN_STEPS))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000020", "step_000040", "step_000060"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000060"
    tb = read_tensorboard(run_dir)
    assert [s for s, _ in tb["loss/total"]] == list(range(TRAIN_STEPS))
    assert tb["loss/total"][-1][1] == pytest.approx(steps[TRAIN_STEPS - 1], rel=1e-6)


def test_preemption_checkpoints_requeues_and_resumes(
    cluster, bundled_shards, reference_run, tmp_path
):
    _, ref_dir = reference_run
    run_dir = tmp_path / "preempted"
    job = submit_pretrain(cluster, bundled_shards, run_dir)
    wait_for_step(run_dir, 5, 180)
    assert squeue_state(cluster, job) == "RUNNING"
    # What Slurm does before the time limit (#SBATCH --signal=B:USR1@…): USR1 to the batch shell.
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    (rec,) = wait_job(cluster, job, 240, slurm_out(run_dir, job))
    out = slurm_out(run_dir, job).read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", out + rank_logs(run_dir)
    assert rec["Restarts"] == "1", out
    assert "preemption warning (USR1)" in out and "launchers exited with 75" in out
    # compiler caches on node-local disk (here: the test's own TORCH_EXTENSIONS_DIR is kept)
    assert "[pretrain.sh] caches: extensions " in out and "inductor " in out
    assert f"requeueing job {job} (restart 1)" in out

    # The first run saved a checkpoint at the step where it stopped, the second resumed from it.
    first = next((run_dir / "logs" / f"job_{job}").glob("*_rank0.log")).read_text()
    second = next((run_dir / "logs" / f"job_{job}_restart1").glob("*_rank0.log")).read_text()
    stopped = int(first.split("checkpoint at step ")[1].split()[0])
    assert 5 < stopped < TRAIN_STEPS and stopped % PREEMPT_CHECK == 0, first
    assert (
        f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:06d}'} at step {stopped}"
        in second
    )

    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(TRAIN_STEPS))
    assert got[TRAIN_STEPS - 1] == ref[TRAIN_STEPS - 1]
    assert got == ref  # the whole curve, before and after the resume


def test_preemption_warning_during_startup_is_repeated(cluster, bundled_shards, tmp_path):
    """A warning that comes while the ranks are still starting (ignoring USR1) is not lost: the
    script repeats it every 10 s until the step ends."""
    run_dir = tmp_path / "early"
    job = sbatch(cluster, "--nodes=2", f"--output={tmp_path}/early.out", "slurm/pretrain.sh",
                 "recipes/tiny_cpu.yaml", *train_overrides(bundled_shards, run_dir),
                 "schedule.train_steps=400", "checkpoint.save_every_steps=100")  # fmt: skip
    # RUNNING in squeue comes before the batch script has run its first line, and a USR1 before
    # its trap is installed kills bash (the default action): a real warning comes minutes into
    # the job, so wait for the script's first output line (printed after the trap), not more.
    out_file, deadline = tmp_path / "early.out", time.monotonic() + 120
    while "[pretrain.sh]" not in (out_file.read_text() if out_file.exists() else ""):
        assert time.monotonic() < deadline, f"job {job} did not start: {squeue_state(cluster, job)}"
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    (rec,) = wait_job(cluster, job, 420, out_file)
    out = (tmp_path / "early.out").read_text()
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", out + rank_logs(run_dir)
    assert "launchers exited with 75" in out
    assert sorted(losses(run_dir)) == list(range(400))


def rank_pid(job: str, rank: int) -> int | None:
    """pid of training rank `rank` of Slurm job `job` on this machine (both nodes live here)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(
                kv.split(b"=", 1)
                for kv in (proc / "environ").read_bytes().split(b"\0")
                if b"=" in kv
            )
        except OSError:
            continue
        if (any(c.endswith(b"pretrain/main.py") for c in cmd) and env.get(b"SLURM_JOB_ID") == job.encode()
                and env.get(b"RANK") == str(rank).encode()):  # fmt: skip
            return int(proc.name)
    return None


def test_killed_rank_fails_the_job_and_resubmission_resumes(
    cluster, bundled_shards, reference_run, tmp_path
):
    _, ref_dir = reference_run
    run_dir = tmp_path / "killed"
    job = submit_pretrain(cluster, bundled_shards, run_dir)
    wait_for_step(run_dir, SAVE_EVERY + 3, 180)  # a checkpoint exists at step 20
    pid = rank_pid(job, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    (rec,) = wait_job(cluster, job, 90, slurm_out(run_dir, job))
    out = slurm_out(run_dir, job).read_text()
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] != "0:0", out
    assert time.monotonic() - t0 < 60, "the job took too long to fail"
    assert sacct_states(cluster, job)[-1][0] == "FAILED"
    assert rec["Restarts"] == "0"  # a crash is not a preemption: no requeue
    killed_at = max(losses(run_dir))
    assert killed_at < TRAIN_STEPS - 1

    # The same command again: resumes from the newest complete checkpoint and finishes.
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    job2 = submit_pretrain(cluster, bundled_shards, run_dir)
    (rec2,) = wait_job(cluster, job2, 240, slurm_out(run_dir, job2))
    log2 = slurm_out(run_dir, job2).read_text()
    assert rec2["JobState"] == "COMPLETED", log2 + rank_logs(run_dir)
    second = next((run_dir / "logs" / f"job_{job2}").glob("*_rank0.log")).read_text()
    assert f"resumed from {run_dir / 'checkpoints' / latest} at step {int(latest[5:])}" in second
    assert losses(run_dir)[TRAIN_STEPS - 1] == losses(ref_dir)[TRAIN_STEPS - 1]


def test_plain_scancel_ends_the_job_without_requeue(cluster, bundled_shards, tmp_path):
    run_dir = tmp_path / "cancelled"
    job = submit_pretrain(cluster, bundled_shards, run_dir)
    wait_for_step(run_dir, 3, 180)
    cluster.run("scancel", job)  # SIGTERM to the batch shell and every rank, then SIGKILL
    (rec,) = wait_job(cluster, job, 60, slurm_out(run_dir, job))
    assert rec["JobState"] == "CANCELLED" and rec["Restarts"] == "0", rec
    time.sleep(8)  # longer than the requeue delay (cred_expire=5): it stays cancelled
    assert squeue_state(cluster, job) == "CANCELLED"
    assert sacct_states(cluster, job)[-1][0] == "CANCELLED"
    assert "requeueing" not in slurm_out(run_dir, job).read_text()
