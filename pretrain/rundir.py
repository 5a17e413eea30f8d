"""One live run per run folder: RUN_DIR/run.lock names the run that owns it.

    lock = RunDirLock(run_dir)
    note = lock.acquire()        # RunDirBusyError if a live run owns the folder
    ...                          # a thread refreshes the lock's mtime every HEARTBEAT_S
    lock.release()

The lock file is created with O_EXCL (atomic on local and NFSv3+ file systems) and holds the
owner's host, pid, Slurm job id and start time. A lock left by a run that is gone is taken over,
with one line saying so:
- same host: its pid no longer exists (kill -9, a crash, an OOM kill);
- same Slurm job id: the job was requeued (it may start on another node);
- another host: its heartbeat (the file's mtime) is older than STALE_AFTER_S.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunDirBusyError(RuntimeError):
    pass


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": uuid.uuid4().hex,  # this lock, as opposed to another of the same process
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDirLock:
    def __init__(self, run_dir: str | Path, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.owner = _me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Owns the folder or raises RunDirBusyError. Returns a note when a stale lock was
        taken over (the caller prints it), else None."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
                f.flush()
                os.fsync(f.fileno())
        except FileExistsError:
            note = self._take_over_if_stale()
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()
        return note

    def _read(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text()), age
        except (OSError, ValueError):  # vanished, or being written this instant
            return None, 0.0

    def _take_over_if_stale(self) -> str:
        held, age = self._read()
        if held is None:  # another run is writing it right now
            time.sleep(1.0)
            held, age = self._read()
        me = self.owner
        if held is not None and (held.get("host"), held.get("pid")) == (me["host"], me["pid"]):
            self.path.write_text(json.dumps(me))  # this process again (a benchmark's second engine)
            return None
        if held is not None:
            who = f"pid {held.get('pid')} on {held.get('host')}"
            if held.get("slurm_job_id"):
                who += f" (Slurm job {held['slurm_job_id']})"
            if me["slurm_job_id"] and held.get("slurm_job_id") == me["slurm_job_id"]:
                why = "the same Slurm job, requeued"
            elif held.get("host") == me["host"]:
                if _pid_alive(int(held.get("pid", -1))):
                    raise RunDirBusyError(self._busy(who, held, age))
                why = "that process no longer exists"
            elif age > self.stale_after_s:
                why = f"no heartbeat for {age:.0f} s"
            else:
                raise RunDirBusyError(self._busy(who, held, age))
        else:
            who, why = "an unreadable lock", "it holds no owner"
        tmp = self.path.with_name(f"{LOCK_NAME}.{me['host']}.{me['pid']}")
        tmp.write_text(json.dumps(me))
        tmp.replace(self.path)
        time.sleep(0.2)  # two runs taking over at once: the last rename wins, the other sees it
        now, _ = self._read()
        if now != me:
            raise RunDirBusyError(f"{self.path.parent}: another run took it over at the same time")
        return f"{self.path}: took over the lock of {who}: {why}"

    def _busy(self, who: str, held: dict, age: float) -> str:
        return (
            f"{self.path.parent} is in use by {who}, started {held.get('started')}, last "
            f"heartbeat {age:.0f} s ago: stop that run or use another run_dir (a lock older than "
            f"{self.stale_after_s:.0f} s, or of a process that is gone, is taken over)"
        )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if this run still owns it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        held, _ = self._read()
        if held == self.owner:
            self.path.unlink(missing_ok=True)
