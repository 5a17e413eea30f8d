"""A real two-node Slurm cluster on this one machine, for tests and for trying the sbatch templates.

    python scripts/local_slurm.py start DIR     # install if missing, configure, start, wait idle
    SLURM_CONF=DIR/slurm.conf sbatch --nodes 2 slurm/pretrain.sh recipes/tiny_cpu.yaml ...
    python scripts/local_slurm.py stop DIR      # cancel its jobs, stop the daemons it started

From Python (a pytest fixture uses exactly this):

    with LocalSlurm(tmp_dir) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env())

Debian's `slurmctld slurmd slurm-client` run without systemd: one slurmctld and two `slurmd -N name`
processes, each slurmd with its own Port= and NodeAddr=127.0.0.1. The node names are added to
/etc/hosts (-> 127.0.0.1) so that the first host of SLURM_JOB_NODELIST works as MASTER_ADDR. What
was found to work here (../shared/DESIGN.md): proctrack/linuxproc (the cgroup default fails in
this container), ReturnToService=2, auth/none + cred/none (no munge), jobcomp/filetxt for `sacct -c`.
Everything else (state, spool, logs, pid files, job completion log) lives under DIR. Only the
daemons started here are stopped, by pid, never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
BINARIES = (
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "sacct",
    "scontrol",
    "scancel",
    "sinfo",
    "srun",
)
NODE_NAMES = ("slurmnode1", "slurmnode2")
HOSTS_FILE = Path("/etc/hosts")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run on this machine (no root, no apt-get); the reason is the message."""


def ensure_installed() -> None:
    """Installs Debian's Slurm packages when a binary is missing (needs root and apt-get)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # stale package lists on a fresh machine: update once, retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        raise SlurmUnavailable(
            f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stderr[-2000:]}"
        )


def ensure_hosts(names: tuple[str, ...]) -> None:
    """Makes every node name resolve to 127.0.0.1 (appends one line to /etc/hosts if needed)."""
    missing = []
    for name in names:
        try:
            if socket.gethostbyname(name) == "127.0.0.1":
                continue
        except OSError:
            pass
        missing.append(name)
    if not missing:
        return
    if not os.access(HOSTS_FILE, os.W_OK):
        raise SlurmUnavailable(f"node names {missing} do not resolve and {HOSTS_FILE} is read-only")
    with open(HOSTS_FILE, "a") as f:
        f.write(
            f"127.0.0.1 {' '.join(missing)}  # local Slurm test nodes (scripts/local_slurm.py)\n"
        )


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: Path, ctld_port: int, node_ports: list[int], nodes: tuple[str, ...],
               cpus_per_node: int) -> str:  # fmt: skip
    """slurm.conf of the local cluster; every path lives under root."""
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname={n} NodeAddr=127.0.0.1 Port={p} CPUs={cpus_per_node} State=UNKNOWN"
        for n, p in zip(nodes, node_ports)
    )
    return f"""# Written by scripts/local_slurm.py: {len(nodes)} slurmd on one machine.
ClusterName=localtest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Short grace between SIGTERM and SIGKILL, and finished jobs stay visible to squeue/scontrol.
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=30
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class LocalSlurm:
    """slurmctld + len(nodes) slurmd on this machine, configured and logged under `root`."""

    def __init__(
        self,
        root: Path | str,
        nodes: tuple[str, ...] = NODE_NAMES,
        cpus_per_node: int | None = None,
    ):
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, int] = {}
        self._procs: list[subprocess.Popen] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the client commands (sbatch, squeue, …): SLURM_CONF points here."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Runs a client command against this cluster."""
        proc = subprocess.run(
            list(cmd), env=kw.pop("env", self.env()), capture_output=True, text=True, **kw
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
            )
        return proc

    # ---------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 90) -> LocalSlurm:
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local cluster runs its daemons as root (SlurmdUser=root)")
        ensure_hosts(self.nodes)
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ports = free_ports(1 + len(self.nodes))
        self.conf.write_text(
            slurm_conf(self.root, ports[0], ports[1:], self.nodes, self.cpus_per_node)
        )
        env = self.env()
        # -D: stay in the foreground, so the pid we hold is the daemon's; -c: no old state.
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)], env)
        for n in self.nodes:
            self._spawn(f"slurmd:{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)], env)
        (self.root / "pids.json").write_text(json.dumps(self.pids, indent=2))
        try:
            self.wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.root / "log" / f"{name.replace(':', '.')}.stdout", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        log.close()
        self._procs.append(proc)
        self.pids[name] = proc.pid

    def node_states(self) -> dict[str, str]:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=20)
        states = {}
        for line in proc.stdout.splitlines():
            name, state = line.split()
            states[name] = state
        return states

    def wait_idle(self, timeout_s: float) -> None:
        deadline, states = time.monotonic() + timeout_s, {}
        while time.monotonic() < deadline:
            dead = [n for n, p in zip(self.pids, self._procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"Slurm daemon(s) {dead} exited at start:\n{self.logs_tail()}")
            states = self.node_states()
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout_s:.0f} s: {states}\n{self.logs_tail()}")

    def logs_tail(self, n_chars: int = 3000) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*")):
            out.append(f"== {p.name}\n{p.read_text(errors='replace')[-n_chars:]}")
        return "\n".join(out)

    def cancel_all(self, timeout_s: float = 30) -> None:
        """Cancels every job of this cluster and waits until none is left running."""
        jobs = self.run("squeue", "-h", "-o", "%A", check=False, timeout=20).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False, timeout=20)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.run(
                "squeue", "-h", "-t", "all", "-o", "%T", check=False, timeout=20
            ).stdout.split()
            if not any(
                s in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING", "REQUEUED") for s in states
            ):
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancels the jobs, then stops exactly the daemons this object started (SIGTERM, then
        SIGKILL after 15 s)."""
        if self._procs and self._procs[0].poll() is None:
            self.cancel_all()
        procs = list(reversed(self._procs))  # slurmd first, slurmctld last
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -------------------------------------------------------------------------------------------
# Shell use: the daemons outlive this process, so `stop` reads the pids `start` recorded.


def _stop_recorded(root: Path) -> None:
    cluster = LocalSlurm(root)
    pids = json.loads((cluster.root / "pids.json").read_text())
    if _alive(pids.get("slurmctld")):
        cluster.cancel_all()
    order = [k for k in pids if k != "slurmctld"] + ["slurmctld"]
    for name in order:
        if _alive(pids.get(name)) and _is_slurm_daemon(pids[name]):
            os.kill(pids[name], signal.SIGTERM)
    deadline = time.monotonic() + 15
    for name in order:
        while _alive(pids.get(name)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pids.get(name)) and _is_slurm_daemon(pids[name]):
            os.kill(pids[name], signal.SIGKILL)
    print(f"stopped {', '.join(f'{k} ({v})' for k, v in pids.items())}")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _is_slurm_daemon(pid: int) -> bool:
    """Guards against a recycled pid: only signal a process that is still a slurm daemon."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("slurmctld", "slurmd")
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    action, root = argv
    if action == "stop":
        _stop_recorded(Path(root))
        return 0
    try:
        cluster = LocalSlurm(root).start()
    except SlurmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # The daemons were started in their own sessions: they keep running after this exits.
    cluster._procs.clear()
    print(f"local Slurm up: nodes {', '.join(cluster.nodes)}, pids {cluster.pids}")
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
