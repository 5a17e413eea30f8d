"""A single-node launcher that stops a run properly: `python -m pretrain.launch [options] SCRIPT ARGS`.

    python -m pretrain.launch --nproc 2 pretrain/main.py recipes/tiny_cpu.yaml run_dir=runs/a

It starts `nproc` ranks of SCRIPT with the variables torch.distributed and DeepSpeed read (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT), as `deepspeed --num_gpus` does, and
differs from it in what happens when the run is stopped:

- SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 sent to this command are forwarded to every rank, once per
  signal received. The ranks save a checkpoint at their next stop check and exit with 75
  (pretrain/preemption.py); this command waits for them and returns 75 only once the checkpoint
  is on disk. A second Ctrl-C is forwarded too and interrupts the ranks at once (no checkpoint).
  DeepSpeed's runner instead dies of SIGTERM at once, leaving its ranks running.
- The ranks run in their own session, so a terminal's Ctrl-C reaches them once, through here.
- A rank that fails (any other non-zero status) leaves its peers stuck in a collective: they get
  --grace_s seconds to exit on their own, then SIGKILL. The status returned is the first failure's.
- A user error (exit status 2) is printed once, not once per rank: ranks write their one-line
  error to PRETRAIN_ERROR_DIR (pretrain/main.py) and this command prints the distinct lines.

Exit status: 0 all ranks done, 75 stopped with a checkpoint, else the first failing rank's status
(128 + n for a rank killed by signal n).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pretrain.preemption import PREEMPT_EXIT_CODE

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
ERROR_DIR_ENV = "PRETRAIN_ERROR_DIR"


def _default_nproc() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.launch",
        description="Start N ranks of SCRIPT on this node; forward SIGTERM/SIGINT/SIGUSR1 to "
        "them and return only when they have exited (75: stopped with a checkpoint).",
    )
    p.add_argument(
        "--nproc", type=int, default=None, help="ranks on this node (default: GPUs, or 1)"
    )
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node_rank", type=int, default=0)
    p.add_argument("--master_addr", default="127.0.0.1")
    p.add_argument("--master_port", type=int, default=29500)
    p.add_argument("--grace_s", type=float, default=30.0,
                   help="after a rank fails, seconds its peers get to exit before SIGKILL")  # fmt: skip
    p.add_argument("script", help="the Python script each rank runs")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return p.parse_args(argv)


def rank_env(
    args: argparse.Namespace, nproc: int, local_rank: int, error_dir: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(args.node_rank * nproc + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(args.nnodes * nproc),
        LOCAL_SIZE=str(nproc),  # DeepSpeed's CPU shared-memory all-reduce reads it
        LOCAL_WORLD_SIZE=str(nproc),
        CROSS_RANK=str(args.node_rank),
        CROSS_SIZE=str(args.nnodes),
        MASTER_ADDR=args.master_addr,
        MASTER_PORT=str(args.master_port),
        PYTHONUNBUFFERED="1",
    )
    env[ERROR_DIR_ENV] = error_dir
    return env


def exit_status(code: int) -> int:
    """Popen's returncode as a shell shows it: -n (killed by signal n) is 128 + n."""
    return 128 - code if code < 0 else code


class Ranks:
    """The running ranks: forwards signals to them and decides the command's exit status."""

    def __init__(self, procs: list[subprocess.Popen], grace_s: float):
        self.procs, self.grace_s = procs, grace_s
        self.failure: tuple[int, int] | None = None  # (rank, status) of the first failure
        self.failed_at: float | None = None

    def forward(self, signum: int, frame: object = None) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def wait(self, poll_s: float = 0.2) -> int:
        while any(p.poll() is None for p in self.procs):
            for rank, p in enumerate(self.procs):
                code = p.poll()
                if code is not None and code not in (0, PREEMPT_EXIT_CODE) and self.failure is None:
                    self.failure, self.failed_at = (rank, exit_status(code)), time.monotonic()
            if self.failed_at is not None and time.monotonic() - self.failed_at > self.grace_s:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(poll_s)
        return self.status()

    def status(self) -> int:
        codes = [exit_status(p.returncode) for p in self.procs]
        if self.failure is not None:
            return self.failure[1]
        failed = [c for c in codes if c not in (0, PREEMPT_EXIT_CODE)]
        if failed:
            return failed[0]
        return PREEMPT_EXIT_CODE if PREEMPT_EXIT_CODE in codes else 0


def print_rank_errors(error_dir: Path) -> bool:
    """Prints the ranks' one-line errors, each distinct line once, in rank order; True if any."""
    seen: list[str] = []
    for f in sorted(error_dir.glob("rank*"), key=lambda f: int(f.name[4:])):
        for line in f.read_text().splitlines():
            if line not in seen:
                seen.append(line)
    for line in seen:
        print(line, file=sys.stderr, flush=True)
    return bool(seen)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nproc = args.nproc or _default_nproc()
    with tempfile.TemporaryDirectory(prefix="pretrain-errors-") as error_dir:
        procs: list[subprocess.Popen] = []
        ranks = Ranks(procs, args.grace_s)
        # Installed before the first rank starts: no signal can fall between two starts.
        for sig in FORWARDED:
            signal.signal(sig, ranks.forward)
        for local_rank in range(nproc):
            cmd = [sys.executable, "-u", args.script, *args.args]
            env = rank_env(args, nproc, local_rank, error_dir)
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        status = ranks.wait()
        explained = print_rank_errors(Path(error_dir))
    if ranks.failure is not None and not explained:
        rank, code = ranks.failure
        print(f"launch: rank {rank} exited with status {code}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
