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
