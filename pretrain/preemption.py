"""Preemption: a signal asks the run to save a checkpoint at a step boundary and exit with
PREEMPT_EXIT_CODE, so that slurm/pretrain.sh requeues the job and the requeued job resumes.

    preemption.install_handler()            # once, in the main thread, before the setup
    with preemption.held():                 # USR1 waits until the setup is done
        run = setup(cfg)
    ...
    # every checkpoint.preempt_check_every_steps optimizer steps, on every rank:
    if preemption.stop_requested():         # all ranks agree (an all-reduce of the flags)
        save_checkpoint(...)
        sys.exit(preemption.PREEMPT_EXIT_CODE)

Signals:
- SIGUSR1 is the preemption warning: Slurm sends it to the batch script before the time limit
  (`#SBATCH --signal=B:USR1@300`, or `scancel --signal=USR1 --batch JOBID`), the script forwards it
  to the ranks and, once they exit with PREEMPT_EXIT_CODE, requeues the job.
- SIGTERM (scancel, the time limit, a node drain, `kill`, a service manager) also stops at the
  next check with a checkpoint, if the grace period (Slurm's KillWait) allows; but the script
  never requeues on SIGTERM: whether to requeue is the batch script's decision (it got USR1
  itself), never the ranks'. So a plain `scancel` ends the job, with its work saved when there is
  time.
- SIGINT (Ctrl-C) stops like SIGTERM; a second SIGINT raises KeyboardInterrupt at once, without
  a checkpoint.
- Under the `deepspeed` launcher, whose runner dies of SIGTERM at once without telling the ranks,
  a rank also stops as if signalled when it sees the runner gone (watch_deepspeed_runner).

The handler only records the signal (nothing else is safe inside a handler); ranks can receive
it at different steps, or not at all, so stop_requested() reduces the flags with MAX over the
process group and every rank takes the same decision at the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterable, Iterator

import torch

from pretrain.distributed import device, get_rank, get_world_size, is_initialized

# EX_TEMPFAIL from sysexits.h, "temporary failure; the user is invited to retry". Distinct from
# what else ends a run: 0 done, 1 a Python error (and torchrun's code for any failed worker), 2 bad
# arguments, 124 timeout(1), 128 + n killed by signal n (137 SIGKILL, 143 SIGTERM), 255 ssh/pdsh.
PREEMPT_EXIT_CODE = 75

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_received: signal.Signals | None = None
_previous: dict[signal.Signals, object] = {}


_runner: tuple[int, int] | None = None  # (deepspeed runner pid, its child: our parent)


def _handler(signum: int, frame: object) -> None:
    global _received
    if _received is None:  # keep the first: it says why the run stopped
        _received = signal.Signals(signum)
    elif signum == signal.SIGINT:  # Ctrl-C twice: stop now
        raise KeyboardInterrupt


def install_handler(signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
    """Records the given signals instead of their default action (termination). Call from the
    main thread (Python delivers signals there). Idempotent; uninstall() restores the old ones."""
    for sig in map(signal.Signals, signals):
        previous = signal.signal(sig, _handler)
        _previous.setdefault(sig, previous)


def watch_deepspeed_runner() -> None:
    """Under `deepspeed` (runner → deepspeed.launcher.launch → this rank), remembers the runner.
    A SIGTERM to the runner, the pid a user or a service manager has, kills it at once and tells
    nobody; the launch process then lives on with its ranks. From now on a rank that finds the
    runner gone stops as if signalled. No-op under other launchers."""
    global _runner
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            _runner = (parent.ppid(), parent.pid)
    except Exception:  # no psutil, or /proc unreadable: nothing to watch
        _runner = None


def _runner_gone() -> bool:
    if _runner is None:
        return False
    runner, launch = _runner
    try:
        import psutil

        return psutil.Process(launch).ppid() != runner
    except Exception:  # the launch process itself is gone
        return True


def uninstall() -> None:
    """Restores the handlers install_handler replaced and forgets a received signal."""
    global _received, _runner
    _runner = None
    for sig, previous in _previous.items():
        signal.signal(sig, previous)
    _previous.clear()
    _received = None


@contextlib.contextmanager
def held(signals: Iterable[int] = (signal.SIGUSR1,)) -> Iterator[None]:
    """Blocks `signals` inside the block; one that arrives stays pending and reaches the handler
    when the block ends. For the setup: processes started meanwhile (DeepSpeed's JIT build runs
    ninja and the compiler) inherit the blocked mask, where a Python handler would be reset to
    the default action on exec, and Slurm signals every process of the step: USR1 would kill
    them. SIGTERM is not held: a job cancelled during setup should not wait for it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def received_signal() -> signal.Signals | None:
    """The first signal this process received since install_handler (None if none)."""
    return _received


def local_stop() -> bool:
    """Whether this rank was asked to stop (a signal, or its deepspeed runner gone). Not agreed
    across ranks: stop_requested() is, or a caller's own all-reduce of this flag."""
    global _received
    if _received is None and _runner_gone():
        print(
            f"rank {get_rank()}: the deepspeed runner is gone: stopping",
            file=sys.stderr,
            flush=True,
        )
        _received = signal.SIGHUP  # the terminal-hangup convention: whoever started us is gone
    return _received is not None


def stop_requested() -> bool:
    """True on every rank if any rank received a stop signal. A collective: call it on all ranks
    at the same point (after the optimizer step). Costs one scalar all-reduce and a host sync."""
    local = local_stop()
    if not is_initialized() or get_world_size() == 1:
        return local
    # A tensor on the backend's device: CUDA for nccl, CPU for gloo.
    flag = torch.tensor([int(local)], dtype=torch.int32, device=device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
