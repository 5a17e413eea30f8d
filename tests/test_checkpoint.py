"""Checkpoint discovery: `latest` names the checkpoint to resume; an incomplete one is skipped."""

from __future__ import annotations

import pytest

from pretrain.checkpoint import checkpoint_root, find_latest


def _ckpt(run_dir, step: int, complete: bool = True) -> None:
    path = checkpoint_root(run_dir) / f"step_{step:06d}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")


def test_latest_names_the_checkpoint(tmp_path):
    assert find_latest(tmp_path) is None
    _ckpt(tmp_path, 100)
    _ckpt(tmp_path, 200)
    (checkpoint_root(tmp_path) / "latest").write_text("step_000100")
    assert find_latest(tmp_path).name == "step_000100"


def test_an_incomplete_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    """Before: a traceback (FileNotFoundError) and no way to resume."""
    _ckpt(tmp_path, 100)
    _ckpt(tmp_path, 200)
    _ckpt(tmp_path, 300, complete=False)
    (checkpoint_root(tmp_path) / "latest").write_text("step_000300")
    assert find_latest(tmp_path).name == "step_000200"
    assert "names step_000300, which is incomplete or missing; using step_000200" in (
        capsys.readouterr().out
    )
    (checkpoint_root(tmp_path) / "latest").write_text("step_000900")  # gone altogether
    assert find_latest(tmp_path).name == "step_000200"


def test_no_complete_checkpoint_at_all_is_a_clear_error(tmp_path):
    _ckpt(tmp_path, 100, complete=False)
    (checkpoint_root(tmp_path) / "latest").write_text("step_000100")
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        find_latest(tmp_path)


# ---------------------------------------------------------------------------------------------
# Loading is weights_only: a planted pickle payload is refused, ours or DeepSpeed's files alike.


class Payload:
    """Unpickling this with weights_only=False runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def plant(path, marker) -> None:
    import torch

    torch.save({"state": Payload(marker)}, path)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    import torch

    from pretrain.checkpoint import rng_state, safe_loading, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    with safe_loading():
        set_rng_state(torch.load(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_safe_loading_refuses_a_payload_even_when_asked_for_weights_only_false(tmp_path):
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from pretrain.checkpoint import UnsafeCheckpointError, safe_loading

    marker, path = tmp_path / "ran", tmp_path / "optim_states.pt"
    plant(path, marker)
    with safe_loading():
        with pytest.raises(
            UnsafeCheckpointError, match=r"optim_states.pt: holds a pickled \S*system"
        ):
            torch.load(path, weights_only=False)
        with pytest.raises(UnsafeCheckpointError):  # DeepSpeed's loader asks for weights_only=False
            TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert not marker.exists()
    assert torch.load is not None and "safe_loading" not in repr(torch.load)  # restored


@pytest.mark.parametrize("victim", ["rng", "deepspeed"])
def test_resume_refuses_a_planted_payload_in_one_line(bundled_shards, tmp_path, victim):
    from engine_fixtures import launch, tiny_overrides

    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    steps = {"schedule.train_steps": 2, "schedule.warmup_steps": 1, "logging.eval_every_steps": 0}
    launch(tiny_overrides(bundled_shards, run_dir, **steps), nproc=1, launcher="python")
    ckpt = run_dir / "checkpoints" / "step_000002"
    files = {"rng": ckpt / "rng" / "rank_0.pt",
             "deepspeed": next(ckpt.glob("*optim_states.pt"))}  # fmt: skip
    plant(files[victim], marker)
    more = {**steps, "schedule.train_steps": 3}
    res = launch(tiny_overrides(bundled_shards, run_dir, **more), nproc=1, launcher="python",
                 check=False)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert not marker.exists()
    assert f"{files[victim]}: holds a pickled" in res.stderr and "refused" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_path(bundled_shards, tmp_path):
    """The model-states file of the final checkpoint is a link to /dev/full, where every write
    fails with ENOSPC, as on a full disk. Before: `unexpected pos … vs …` from torch's writer,
    in a traceback."""
    from engine_fixtures import launch, tiny_overrides

    run_dir = tmp_path / "run"
    target = run_dir / "checkpoints" / "step_000002" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    target.parent.mkdir(parents=True)
    target.symlink_to("/dev/full")
    steps = {"schedule.train_steps": 2, "schedule.warmup_steps": 1, "logging.eval_every_steps": 0}
    res = launch(tiny_overrides(bundled_shards, run_dir, **steps), nproc=1, launcher="python",
                 check=False)  # fmt: skip
    assert res.returncode == 1, res.stderr
    line = f"error: no space left on device: writing checkpoint {target.parent} failed"
    assert line in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not target.parent.exists()  # the partial checkpoint is gone


def test_export_refuses_a_planted_payload_in_one_line(bundled_shards, tmp_path):
    import subprocess
    import sys

    from engine_fixtures import REPO, engine_env, launch, tiny_overrides

    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    steps = {"schedule.train_steps": 2, "schedule.warmup_steps": 1, "logging.eval_every_steps": 0}
    launch(tiny_overrides(bundled_shards, run_dir, **steps), nproc=1, launcher="python")
    victim = next((run_dir / "checkpoints" / "step_000002").glob("*optim_states.pt"))
    plant(victim, marker)
    res = subprocess.run([sys.executable, "-m", "pretrain.export", str(run_dir), str(tmp_path / "hf")],
                         cwd=REPO, env=engine_env(), capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and not marker.exists(), res.stderr
    assert f"error: {victim}: holds a pickled" in res.stderr and "Traceback" not in res.stderr
