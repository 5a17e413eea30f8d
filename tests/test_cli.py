"""Every command a user runs answers --help with its usage and exit status 0 (before:
`python -m pretrain.evaluate --help` printed its help and exited 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [
    ["-m", "data_pipeline.tokenizer"], ["-m", "data_pipeline.tokenizer", "train"],
    ["-m", "data_pipeline.preprocess"], ["-m", "data_pipeline.verify"], ["-m", "data_pipeline.show"],
    ["pretrain/main.py"], ["-m", "pretrain.launch"], ["-m", "pretrain.export"],
    ["-m", "pretrain.evaluate"], ["-m", "pretrain.experiments.nlrx"],
]  # fmt: skip


def test_every_command_answers_help_with_exit_0():
    procs = {
        " ".join(c): subprocess.Popen(
            [sys.executable, *c, "--help"],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for c in COMMANDS
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name} --help exited {proc.returncode}:\n{out[-2000:]}"
        assert "usage" in out.lower() or "SYNOPSIS" in out, f"{name} --help printed:\n{out[:500]}"
