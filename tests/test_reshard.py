"""Resume at another world size (Slurm requeues on whatever nodes are free): a checkpoint
written by N ranks is loaded by M through DeepSpeed's universal format, converted once by rank 0.
The weights and Adam moments arrive exactly; the data position continues exactly once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import (
    REPO,
    TINY,
    engine_env,
    free_port,
    launch,
    read_metrics,
    tiny_overrides,
)

WORKER = Path(__file__).with_name("reshard_worker.py")


def overrides(shards: Path, run_dir: Path, world: int, steps: int) -> list[str]:
    """The same global batch at either world size: 4 rows a step."""
    return tiny_overrides(
        shards, run_dir, **{"schedule.train_steps": steps, "schedule.warmup_steps": 1,
                            "data.grad_accum_steps": 2 // world, "checkpoint.save_every_steps": 3,
                            "logging.eval_every_steps": 0},
    )  # fmt: skip


def engine_state(run_dir: Path, shards: Path, world: int, out: Path) -> dict:
    """What an engine of `world` ranks holds after resuming run_dir (reshard_worker.py)."""
    script = [str(WORKER), str(out), str(TINY), *overrides(shards, run_dir, world, 6)]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={world}",
               f"--master_port={free_port()}", *script]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=engine_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True) | {"stdout": proc.stdout}


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_checkpoint_of_n_ranks_resumes_on_m(bundled_shards, tmp_path, before, after):
    run_dir = tmp_path / "run"
    launch(overrides(bundled_shards, run_dir, before, 3), nproc=before)  # checkpoint at step 3
    native = engine_state(run_dir, bundled_shards, before, tmp_path / "native.pt")
    moved = engine_state(run_dir, bundled_shards, after, tmp_path / "moved.pt")
    assert f"written by {before} ranks, this run has {after}: converting" in moved["stdout"]
    assert native["step"] == moved["step"] == 3
    assert native["params"].keys() == moved["params"].keys()
    for name, (w, m, v) in native["params"].items():
        w2, m2, v2 = moved["params"][name]
        assert torch.equal(w, w2) and torch.equal(m, m2) and torch.equal(v, v2), name
    # The data position: the new ranks start a layer recording what each old rank consumed, and
    # split exactly the records that remain (tests/test_dataset.py checks the records themselves).
    old, new = native["data"]["ranks"], moved["data"]["ranks"]
    assert len(old) == before and len(new) == after
    consumed = [r["cursor"] for r in old]
    assert all(r["layers"][-1] == {"world_size": before, "cursors": consumed} for r in new)
    assert all(r["cursor"] == 0 for r in new)
    assert sum(r["part_len"] for r in new) == sum(r["part_len"] - r["cursor"] for r in old)

    # And training goes on: the converted checkpoint is reused, not converted again.
    res = launch(overrides(bundled_shards, run_dir, after, 6), nproc=after)
    assert "loading its universal form" in res.stdout and "resumed from" in res.stdout
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == [0, 1, 2, 3, 4, 5]  # each step once: the old run's 0-2, the new one's 3-5
    assert all(r["loss/lm"] < rows[0]["loss/lm"] for r in rows[3:])
