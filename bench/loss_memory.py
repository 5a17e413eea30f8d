"""Peak memory and time of one forward + backward of the summed LM-head cross-entropy on CPU: the
full-logits path against the chunked fused path, side by side in one run.

    python bench/loss_memory.py [--hidden 2048] [--seq_len 2048] [--rows 1] [--vocabs 32000,128256]
                                [--labelled_fraction 0.6] [--chunk_tokens 0] [--repeats 1]
                                [--no_profile] [--quick]

A micro-batch of --rows rows of seq_len positions (T = rows × seq_len), fp32, hidden size
--hidden (2048: Llama-3.2-1B); a random labelled_fraction of the positions carries a label, the
rest IGNORE_INDEX (like JEPA view segments and padding). Gradients flow to the hidden states
(T, H) and the head weight (V, H).

    full      logits = F.linear(hidden, weight) at every position (T, V), then
              lm_loss_sum(logits[None], labels[None])   (lm_loss="full")
    new       hidden.index_select(0, label_index), then linear_cross_entropy_sum(h, weight,
              targets, chunk_tokens=--chunk_tokens)      (lm_loss="chunked", as the objective does)

Each (path, vocab) case runs in a fresh subprocess (the script re-invokes itself with --case
PATH:VOCAB) with glibc told to mmap every block over 128 KiB and to trim the heap (so freed
memory leaves the process): it builds the inputs in place, warms up without running the loss
(touches the inputs; a tiny linear + cross-entropy loads the kernels), reads the high-water mark
ru_maxrss, runs the loss forward + backward once and reads ru_maxrss again. "peak MiB" is the
difference: the peak of the loss's own allocations, the (V, H) weight gradient it leaves included.
"profiler MiB" cross-checks it: the peak of the running sum of the allocations torch.profiler
(profile_memory=True) records during a further forward + backward. For reference, one (T, V)
fp32 tensor and the (V, H) fp32 weight gradient are printed too. "seconds" is the median wall time
of the forward + backward over --repeats runs (the first is the measured one); "cpu/wall" the
process's CPU seconds per wall second in the first run (below the thread count: the CPUs were
shared, and the time is inflated).

Printed: the table, then per vocab `peak memory new/full, vocab V: r`, `time new/full, vocab V: r`
and `loss rel. diff new vs full, vocab V: d` (the two paths' losses agree to d).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_pipeline.packing import IGNORE_INDEX  # noqa: E402
from pretrain.loss import default_chunk_tokens, linear_cross_entropy_sum, lm_loss_sum  # noqa: E402

PATHS = ("full", "new")
MIB = 2**20
# glibc reads these at start-up: blocks over 128 KiB are mmapped (and unmapped when freed), the
# heap is trimmed, and the mmap threshold stops adapting upwards.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_inputs(args, vocab: int) -> dict[str, torch.Tensor]:
    """Built in place: no temporary raises the high-water mark above the inputs themselves."""
    gen = torch.Generator().manual_seed(0)
    t, h = args.rows * args.seq_len, args.hidden
    hidden = torch.empty(t, h).normal_(generator=gen).requires_grad_()
    weight = torch.empty(vocab, h).normal_(0.0, h**-0.5, generator=gen).requires_grad_()
    labels = torch.randint(0, vocab, (t,), generator=gen)
    n_lab = round(args.labelled_fraction * t)
    labels[torch.randperm(t, generator=gen)[n_lab:]] = IGNORE_INDEX
    index = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)  # the trainer's label_index
    return {"hidden": hidden, "weight": weight, "labels": labels, "index": index,
            "targets": labels[index]}  # fmt: skip


def loss_full(x: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = F.linear(x["hidden"], x["weight"])  # (T, V)
    return lm_loss_sum(logits[None], x["labels"][None])[0]


def loss_new(x: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    h = x["hidden"].index_select(0, x["index"])  # (N, H): labelled positions only
    return linear_cross_entropy_sum(h, x["weight"], x["targets"], chunk_tokens=chunk_tokens)


def fwd_bwd(path: str, x: dict[str, torch.Tensor], chunk_tokens: int) -> float:
    """One forward + backward from zero gradients; the loss value."""
    x["hidden"].grad = x["weight"].grad = None
    loss = loss_full(x) if path == "full" else loss_new(x, chunk_tokens)
    loss.backward()
    return float(loss.detach())


def profiled_peak(path: str, x: dict[str, torch.Tensor], chunk_tokens: int) -> int:
    """Peak of the running sum of the CPU allocations torch.profiler records in one fwd + bwd."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    x["hidden"].grad = x["weight"].grad = None
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(path, x, chunk_tokens)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def warm_up(x: dict[str, torch.Tensor]) -> None:
    """Touches every input page and loads the kernels, without running the loss at size."""
    with torch.no_grad():
        for name in ("hidden", "weight"):
            x[name].sum()
    h = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    y = torch.randint(0, 32, (8,))
    lm_loss_sum(F.linear(h, w)[None], y[None])[0].backward()
    linear_cross_entropy_sum(h, w, y, chunk_tokens=4).backward()


def run_case(args) -> None:
    path, vocab = args.case.split(":")
    vocab = int(vocab)
    x = make_inputs(args, vocab)
    warm_up(x)
    gc.collect()
    before, rss_before = max_rss_bytes(), rss_bytes()
    times = []
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    loss = fwd_bwd(path, x, args.chunk_tokens)
    times.append(time.perf_counter() - t0)
    after, cpu = max_rss_bytes(), cpu_seconds() - cpu0
    for _ in range(args.repeats - 1):
        t0 = time.perf_counter()
        fwd_bwd(path, x, args.chunk_tokens)
        times.append(time.perf_counter() - t0)
    prof = profiled_peak(path, x, args.chunk_tokens) if args.profile else None
    out = {"path": path, "vocab": vocab, "loss": loss, "peak": after - before,
           "baseline_gap": before - rss_before, "profiler_peak": prof,
           "seconds": statistics.median(times), "cpu_per_wall": cpu / times[0],
           "labelled": int(x["index"].numel())}  # fmt: skip
    print("CASE " + json.dumps(out), flush=True)


def spawn(args, path: str, vocab: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", f"{path}:{vocab}",
           "--hidden", str(args.hidden), "--seq_len", str(args.seq_len), "--rows", str(args.rows),
           "--labelled_fraction", str(args.labelled_fraction),
           "--chunk_tokens", str(args.chunk_tokens), "--repeats", str(args.repeats)]  # fmt: skip
    if not args.profile:
        cmd.append("--no_profile")
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASE ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"case {path}:{vocab} failed (exit {proc.returncode}):\n"
                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")  # fmt: skip
    return json.loads(lines[-1][len("CASE ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=1, help="rows of seq_len positions per micro-batch")
    p.add_argument("--vocabs", default="32000,128256", help="comma-separated vocab sizes")
    p.add_argument("--labelled_fraction", type=float, default=0.6)
    p.add_argument("--chunk_tokens", type=int, default=0, help="0: default_chunk_tokens(V)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no_profile", dest="profile", action="store_false",
                   help="skip the torch.profiler cross-check (one more fwd + bwd per case)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--case", help=argparse.SUPPRESS)  # PATH:VOCAB, in the child process
    args = p.parse_args()
    if args.quick:
        args.hidden, args.seq_len, args.vocabs = 64, 256, "1000,4000"
    if args.case:
        run_case(args)
        return

    vocabs = [int(v) for v in args.vocabs.split(",")]
    n_lab = round(args.labelled_fraction * args.rows * args.seq_len)
    print(f"hidden {args.hidden}, {args.rows} row(s) of seq_len {args.seq_len}, {n_lab} labelled "
          "positions, fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"repeats {args.repeats}")  # fmt: skip
    results = {(path, v): spawn(args, path, v) for v in vocabs for path in PATHS}

    print(f"\n{'vocab':>7}  {'path':<5} {'chunk':>6} {'peak MiB':>9} {'profiler MiB':>13} "
          f"{'seconds':>8} {'cpu/wall':>8}  loss")  # fmt: skip
    for v in vocabs:
        for path in PATHS:
            r = results[(path, v)]
            chunk = "-" if path == "full" else str(args.chunk_tokens or default_chunk_tokens(v))
            prof = "-" if r["profiler_peak"] is None else f"{r['profiler_peak'] / MIB:.0f}"
            print(f"{v:>7}  {path:<5} {chunk:>6} {r['peak'] / MIB:>9.0f} {prof:>13} "
                  f"{r['seconds']:>8.3f} {r['cpu_per_wall']:>8.2f}  {r['loss']:.6g}")  # fmt: skip
            if r["baseline_gap"] > 16 * MIB:
                print(f"         warning: the high-water mark was {r['baseline_gap'] / MIB:.0f} "
                      "MiB above the RSS before the loss: peak MiB is an underestimate")  # fmt: skip
        t = args.rows * args.seq_len
        print(f"{'':>7}  reference: one ({t}, {v}) fp32 tensor "
              f"{t * v * 4 / MIB:.0f} MiB, the ({v}, {args.hidden}) fp32 weight "
              f"gradient {v * args.hidden * 4 / MIB:.0f} MiB")  # fmt: skip
    print()
    for v in vocabs:
        full, new = results[("full", v)], results[("new", v)]
        mem = new["peak"] / full["peak"] if full["peak"] > 0 else float("nan")
        rel = abs(new["loss"] - full["loss"]) / max(abs(full["loss"]), 1e-30)
        print(f"peak memory new/full, vocab {v}: {mem:.3f}")
        if full["profiler_peak"]:
            print(f"profiler peak new/full, vocab {v}: "
                  f"{new['profiler_peak'] / full['profiler_peak']:.3f}")  # fmt: skip
        print(f"time new/full, vocab {v}: {new['seconds'] / full['seconds']:.3f}")
        print(f"loss rel. diff new vs full, vocab {v}: {rel:.3e}")


if __name__ == "__main__":
    main()
