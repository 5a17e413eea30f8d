"""Helpers for the engine tests: launch the real entry point as 1 or 2 CPU processes, read back
what a run wrote. Shards come from conftest's `bundled_shards` (real tokenizer + preprocess)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "recipes" / "tiny_cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    # DeepSpeed JIT-compiles its shared-memory comm op once (~70 s); reuse the cached build.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tiny_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    """A run of a few steps on the tiny recipe: every step logged, fp32 on CPU."""
    base = {
        "data.paths": f"[{shards}]",
        "run_dir": str(run_dir),
        "data.seq_len_tokens": 128,
        "data.micro_batch_rows": 2,
        "logging.log_every_steps": 1,
        "logging.eval_batches": 2,
        "logging.progress_bar": "false",
        "schedule.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch_command(overrides: list[str], nproc: int, launcher: str, port: int,
                   recipe: Path = TINY) -> list[str]:  # fmt: skip
    """The command line that runs pretrain/main.py on `recipe` (tiny) with `nproc` processes."""
    port = str(port)
    script = [str(REPO / "pretrain" / "main.py"), str(recipe), *overrides]
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}", *script]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}", *script]
    elif launcher == "launch":  # pretrain/launch.py
        cmd = [sys.executable, "-m", "pretrain.launch", f"--nproc={nproc}", f"--master_port={port}",
               *script]  # fmt: skip
    elif launcher == "python":
        assert nproc == 1
        cmd = [sys.executable, *script]
    else:
        raise ValueError(launcher)
    return cmd


def launch(overrides: list[str], nproc: int = 2, launcher: str = "torchrun", timeout: int = 300,
           check: bool = True, port: int | None = None,
           recipe: Path = TINY) -> subprocess.CompletedProcess:  # fmt: skip
    """Runs pretrain/main.py on `recipe` (tiny) with `nproc` CPU processes."""
    cmd = launch_command(overrides, nproc, launcher, port or free_port(), recipe)
    proc = subprocess.run(
        cmd, cwd=REPO, env=engine_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), …]} of every scalar in run_dir/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


# One 2-rank run shared by the train, TensorBoard and export tests (a launch costs ~10 s).
STRAIGHT_STEPS = 6
_CACHE: dict[str, Path] = {}


def straight_run(shards: Path, root: Path) -> Path:
    """2 ranks, ZeRO-3, fp32, launched with `deepspeed`: 6 steps, 2 accumulation micro-steps,
    eval and checkpoint every 3 steps. Built once per session."""
    if "straight" not in _CACHE:
        run_dir = root / "straight"
        launch(straight_overrides(shards, run_dir), launcher="deepspeed")
        _CACHE["straight"] = run_dir
    return _CACHE["straight"]


def straight_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    return tiny_overrides(
        shards, run_dir,
        **{"schedule.train_steps": STRAIGHT_STEPS, "data.grad_accum_steps": 2,
           "logging.eval_every_steps": 3, "checkpoint.save_every_steps": 3, **extra},
    )  # fmt: skip
