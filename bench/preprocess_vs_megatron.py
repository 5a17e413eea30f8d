"""Our preprocessing per core against Megatron-LM's (issue 12): `python -m data_pipeline.preprocess`,
Megatron's tools/preprocess_data.py and, where the checkout has it, tools/preprocess_data_fast.py
(gigatoken), on the same input with the same Hugging Face tokenizer, side by side in one run.

    python bench/preprocess_vs_megatron.py --megatron ~/Megatron-LM [--python PY]
        [--repeat 5] [--rounds 3] [--workers 1,2] [--vocab_size 8000] [--doc_records 1]
        [--fast_only]

--megatron: a Megatron-LM checkout (or the files the tools import: tools/, megatron/core,
megatron/training). --python: the interpreter that runs Megatron's tools (default: this one);
it needs what they import: Python >= 3.12 (3.11 imports them once `typing.override` exists, e.g.
set from typing_extensions in a sitecustomize.py), torch, transformers, numpy, triton (imported
through megatron.core even on a CPU), and gigatoken for the fast path.

Input: bench/preprocess.py's `--corpus mixed` (the four bundled chat sets, `--repeat` times,
words shuffled after the first; 43 MB at 5), and two files made from it for Megatron, which
reads one text field per `--json-keys` key:
  1 view:  text.jsonl, {"text": user + "\\n\\n" + assistant}; every tool reads this file
           (ours: --views text; Megatron: --json-keys text).
  2 views: flat.jsonl, {"user": ..., "assistant": ...}; Megatron: --json-keys user assistant.
           Ours reads flat.jsonl too (--views user,assistant: the ratios refer to this) and
           the chat records (--views messages, as a user would: system prompts are read and
           dropped; twice the bytes of flat.jsonl).
--doc_records N: each document joins N consecutive records (users and assistants each joined by
"\n"), so a document is N times as long (30: ~4 KB, the length of a web page; 1: the paper's
~130-byte records, where the cost per record weighs most). --fast_only: Megatron's
preprocess_data_fast.py only (preprocess_data.py takes ~10x the others' time).
Every tool writes the same token ids (checked: equal token totals); ours also writes its val
split, the manifest and sha256 checksums. Megatron without --append-eod; ours with
--max_record_tokens 10^9 (nothing skipped).

Per core: W workers is `--num_workers W` for ours, `--workers W` for preprocess_data.py (which
also reads and writes in its main process) and W gigatoken threads for preprocess_data_fast.py
(which has no --workers: it tokenizes on a thread pool of all cores). RAYON_NUM_THREADS=W for
every tool, so gigatoken's thread pool (ours uses it too) has W threads. CPU time is user +
system of the process and all its children.
Each round runs every tool twice, in fresh processes: the command a user types on the whole
input (start-up included), then a harness that imports the tool and calls its main() on the
input's first 20 lines (warm-up), on them again and on the whole input, the last two timed in
the process: "excl. start-up" is their difference, the work without imports, tokenizer loading
or starting the pool (ours with W > 1 gets those 20 lines in 2W units, so that its pool starts
in that call too). The tools are alternated `--rounds` times; ratios are medians over rounds of
each tool's time ÷ ours (> 1: ours is faster). Per MB: of the file Megatron reads (text.jsonl,
flat.jsonl). Numbers go to docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from preprocess import MIXED, write_corpus  # noqa: E402  (bench/preprocess.py)

from data_pipeline.sources import iter_view_texts  # noqa: E402
from data_pipeline.tokenizer import train_tokenizer  # noqa: E402

SHORT_LINES = 20
# Megatron's .idx: magic (9 bytes), version (<Q), then a dtype code (<B) → bytes per token id.
MEGATRON_DTYPE_OFFSET = 17
MEGATRON_DTYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


@dataclass(frozen=True)
class Tool:
    name: str
    input: str  # file name in the work folder
    args: tuple[str, ...]  # what selects the views / keys
    kind: str  # "ours" | "megatron" | "fast"


def build_inputs(work: Path, repeat: int, doc_records: int = 1) -> None:
    """chat.jsonl (ours), text.jsonl and flat.jsonl (the same texts as Megatron reads them), and
    each one's first SHORT_LINES lines (the start-up runs)."""
    write_corpus(work / "chat.jsonl", "mixed", repeat)
    if doc_records > 1:
        records = (work / "chat.jsonl").read_text().splitlines()
        with open(work / "chat.jsonl", "w") as f:
            for lo in range(0, len(records), doc_records):
                views = [_user_assistant(line) for line in records[lo : lo + doc_records]]
                f.write(json.dumps({"messages": [
                    {"role": role, "content": "\n".join(v[i] for v in views)}
                    for i, role in enumerate(("user", "assistant"))]}) + "\n")  # fmt: skip
    with open(work / "chat.jsonl") as f, open(work / "flat.jsonl", "w") as flat, \
            open(work / "text.jsonl", "w") as text:  # fmt: skip
        for line in f:
            user, assistant = _user_assistant(line)
            flat.write(json.dumps({"user": user, "assistant": assistant}) + "\n")
            text.write(json.dumps({"text": f"{user}\n\n{assistant}"}) + "\n")
    for name in ("chat", "flat", "text"):
        with open(work / f"{name}.jsonl") as f, open(work / f"{name}.short.jsonl", "w") as short:
            short.writelines(line for _, line in zip(range(SHORT_LINES), f))


def _user_assistant(line: str) -> tuple[str, str]:
    by_role = {m["role"]: m["content"] for m in json.loads(line)["messages"]}
    return by_role["user"], by_role["assistant"]


def flags(tool: Tool, data: Path, tok: Path, out: Path, workers: int) -> list[str]:
    """The tool's command-line flags (after `python -m data_pipeline.preprocess` or the script)."""
    if tool.kind == "ours":
        return ["--inputs", str(data), "--views", *tool.args, "--tokenizer", str(tok),
                "--out", str(out), "--num_workers", str(workers),
                "--max_record_tokens", str(10**9), "--progress", "False"]  # fmt: skip
    common = ["--input", str(data), "--output-prefix", str(out / "m"), "--json-keys", *tool.args,
              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok)]  # fmt: skip
    if tool.kind == "fast":
        return [*common, "--use-gigatoken"]
    return [*common, "--workers", str(workers), "--log-interval", str(10**9)]


def entry(tool: Tool, megatron: Path, python: str) -> tuple[str, str]:
    """(interpreter, script), the script "ours" for `-m data_pipeline.preprocess`."""
    if tool.kind == "ours":
        return sys.executable, "ours"
    name = "preprocess_data_fast.py" if tool.kind == "fast" else "preprocess_data.py"
    return python, str(megatron / "tools" / name)


def count_tokens(tool: Tool, out: Path) -> int:
    if tool.kind == "ours":
        splits = json.loads((out / "manifest.json").read_text())["splits"]
        return sum(s["tokens"] for s in splits.values())
    total = 0
    for idx in out.glob("m_*.idx"):
        code = idx.read_bytes()[MEGATRON_DTYPE_OFFSET]
        total += idx.with_suffix(".bin").stat().st_size // MEGATRON_DTYPE_BYTES[code]
    return total


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class ToolFailed(RuntimeError):
    """A tool's process exited non-zero; the message is the last line it wrote."""


def run(cmd: list[str], workers: int) -> tuple[float, float, str]:
    """(wall s, CPU s of the process and its children, stdout) of one fresh process; ToolFailed
    if it fails."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")  # fmt: skip
    c, t = cpu_children(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, cpu_children() - c
    if proc.returncode:
        raise ToolFailed(last_line(proc.stderr or proc.stdout))
    return wall, cpu, proc.stdout


# In one fresh interpreter: the tool's imports, then its main() on the first lines (warm-up), on
# the first lines again and on the whole input, the last two timed here (wall, CPU of the process
# and its children). Their difference is the work without any start-up: imports, tokenizer
# loading, starting the pool. argv: script ("ours" or a Megatron tool), [flags of each call].
HARNESS = """
import importlib.util, json, os, resource, shutil, sys, time
def cpu():
    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
script, calls = sys.argv[1], json.loads(sys.argv[2])
if script == "ours":
    from data_pipeline.preprocess import main as ours
    call = lambda argv: ours(argv)
else:
    # A module in sys.modules: its pool pickles the tool's own classes by module name.
    spec = importlib.util.spec_from_file_location("megatron_tool", script)
    tool = sys.modules["megatron_tool"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    def call(argv):
        sys.argv = [script, *argv]
        tool.main()
times = []
for i, (argv, out) in enumerate(calls):
    os.makedirs(out)
    t, c = time.perf_counter(), cpu()
    if call(argv):
        sys.exit(f"{script} failed")
    times.append((time.perf_counter() - t, cpu() - c))
    if i < len(calls) - 1:
        shutil.rmtree(out)
print(json.dumps(times[1:]))
"""


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def check_checkout(megatron: Path) -> None:
    """Exits with one line unless `megatron` holds what the tools import."""
    if not megatron.is_dir():
        sys.exit(f"--megatron {megatron}: no such folder (give a Megatron-LM checkout)")
    needed = ["tools/preprocess_data.py", "megatron/core/datasets/indexed_dataset.py",
              "megatron/core/tokenizers/utils/build_tokenizer.py"]  # fmt: skip
    if missing := [p for p in needed if not (megatron / p).is_file()]:
        sys.exit(f"--megatron {megatron}: not a Megatron-LM checkout (no {missing[0]})")


def cli(tool: Tool, megatron: Path, python: str, data: Path, tok: Path, out: Path,
        workers: int) -> list[str]:  # fmt: skip
    """The command a user types."""
    interpreter, script = entry(tool, megatron, python)
    head = ["-m", "data_pipeline.preprocess"] if script == "ours" else [script]
    return [interpreter, *head, *flags(tool, data, tok, out, workers)]


def probe_megatron(megatron: Path, python: str, work: Path, tok: Path) -> dict[str, str]:
    """Runs both tools on 20 lines. Exits with one line unless preprocess_data.py runs; returns
    why the fast path cannot run ({"fast": reason}), or nothing."""
    skipped = {}
    for kind in ("megatron", "fast"):
        if kind == "fast" and not (megatron / "tools" / "preprocess_data_fast.py").is_file():
            skipped[kind] = "no tools/preprocess_data_fast.py in this checkout"
            continue
        tool, out = Tool(kind, "text.short.jsonl", ("text",), kind), work / f"probe-{kind}"
        out.mkdir()
        try:
            run(cli(tool, megatron, python, work / tool.input, tok, out, 1), 1)
            continue
        except ToolFailed as e:
            why = str(e)
        finally:
            shutil.rmtree(out)
        if "cannot import name 'override' from 'typing'" in why:
            why += " (Megatron-LM needs Python >= 3.12: --python)"
        if kind == "megatron":
            sys.exit(f"Megatron's tools/preprocess_data.py does not run with {python}: {why}")
        skipped[kind] = why
    return skipped


def measure_once(tool: Tool, megatron: Path, python: str, work: Path, tok: Path,
                 workers: int) -> dict:  # fmt: skip
    """The command a user types on the whole input (start-up included), then the harness (the
    same work without start-up); {"incl", "excl": (wall s, CPU s), "tokens"}."""
    full, out = work / tool.input, work / "out"
    short = full.with_suffix(".short.jsonl")
    out.mkdir()
    try:
        wall, cpu, _ = run(cli(tool, megatron, python, full, tok, out, workers), workers)
        tokens = count_tokens(tool, out)
        shutil.rmtree(out)
        interpreter, script = entry(tool, megatron, python)
        calls = [[flags(tool, data, tok, work / f"out{i}", workers), str(work / f"out{i}")]
                 for i, data in enumerate((short, short, full))]  # fmt: skip
        if tool.kind == "ours" and workers > 1:  # first lines in 2W units: the pool starts too
            for argv, _ in calls[:2]:
                argv += ["--shard_bytes", str(max(1, short.stat().st_size // (2 * workers)))]
        stdout = run([interpreter, "-c", HARNESS, script, json.dumps(calls)], workers)[2]
    except ToolFailed as e:
        sys.exit(f"{tool.name} failed with {workers} worker(s): {e}")
    (w0, c0), (w1, c1) = json.loads(stdout.strip().splitlines()[-1])
    shutil.rmtree(work / "out2")
    return {"incl": (wall, cpu), "excl": (w1 - w0, c1 - c0), "tokens": tokens}


def measure(tools: list[Tool], megatron: Path, python: str, work: Path, tok: Path,
            workers: int, rounds: int) -> dict[str, list[dict]]:  # fmt: skip
    """Every tool, alternated `rounds` times; per tool, one measure_once per round."""
    runs: dict[str, list[dict]] = {t.name: [] for t in tools}
    for r in range(rounds):
        for tool in tools if r % 2 == 0 else tools[::-1]:
            res = measure_once(tool, megatron, python, work, tok, workers)
            runs[tool.name].append(res)
            (w, c), (we, ce) = res["incl"], res["excl"]
            print(f"  {workers} worker(s) round {r} {tool.name:<34} wall {w:6.2f} s  cpu {c:6.2f} s"
                  f"  excl. start-up: wall {we:6.2f} s  cpu {ce:6.2f} s", flush=True)  # fmt: skip
    return runs


def _metrics(res: dict) -> list[float]:
    return [*res["incl"], *res["excl"]]


def report(title: str, runs: dict[str, list[dict]], mb: float) -> None:
    """Medians per tool, and the median over rounds of each tool's time ÷ ours (> 1: ours faster);
    ours is the first tool."""
    ours = next(iter(runs))
    tokens = {name: rs[0]["tokens"] for name, rs in runs.items()}
    print(f"\n{title}: {mb:.1f} MB, {tokens[ours]:,} tokens")
    if len(set(tokens.values())) > 1:
        print(f"  TOKEN TOTALS DIFFER: {tokens}")
    print(f"  {'tool':<36}{'wall s':>7}{'cpu s':>7}{'start-up cpu s':>15} | excl. start-up:"
          f"{'wall s/MB':>10}{'cpu s/MB':>9} | ÷ ours: wall, cpu; excl. start-up: wall, cpu")  # fmt: skip
    ratios = {}
    for name, rs in runs.items():
        med = [statistics.median(_metrics(r)[i] for r in rs) for i in range(4)]
        startup = statistics.median(r["incl"][1] - r["excl"][1] for r in rs)
        ratios[name] = [statistics.median(_metrics(r)[i] / _metrics(o)[i]
                                          for r, o in zip(rs, runs[ours])) for i in range(4)]  # fmt: skip
        print(f"  {name:<36}{med[0]:>7.2f}{med[1]:>7.2f}{startup:>15.2f} |{'':>15}"
              f"{med[2] / mb:>10.3f}{med[3] / mb:>9.3f} | {ratios[name][0]:.2f}, "
              f"{ratios[name][1]:.2f}; {ratios[name][2]:.2f}, {ratios[name][3]:.2f}")  # fmt: skip
    theirs = {n: r for n, r in ratios.items() if n.startswith("Megatron")}
    fastest = min(theirs, key=lambda n: theirs[n][3])
    verdict = "ours at least as fast" if theirs[fastest][3] >= 1 else "ours SLOWER"
    print(f"  per core (CPU s excl. start-up), Megatron's fastest here ({fastest}) ÷ ours: "
          f"{theirs[fastest][3]:.2f}: {verdict}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--megatron", type=Path, required=True, help="a Megatron-LM checkout")
    ap.add_argument("--python", default=sys.executable, help="interpreter for Megatron's tools")
    ap.add_argument("--repeat", type=int, default=5, help="copies of the bundled chat sets")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the tools")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--vocab_size", type=int, default=8000)
    ap.add_argument("--doc_records", type=int, default=1, help="records joined per document")
    ap.add_argument("--fast_only", action="store_true", help="not Megatron's preprocess_data.py")
    args = ap.parse_args()
    megatron = args.megatron.expanduser().resolve()
    check_checkout(megatron)
    with tempfile.TemporaryDirectory() as tmp:
        work, tok = Path(tmp), Path(tmp) / "tok"
        build_inputs(work, args.repeat, args.doc_records)
        train_tokenizer(iter_view_texts([str(s) for s in MIXED], "messages"), tok,
                        vocab_size=args.vocab_size)  # fmt: skip
        skipped = probe_megatron(megatron, args.python, work, tok)
        for why in skipped.values():
            print(f"preprocess_data_fast.py not run: {why}")
        if args.fast_only:
            skipped["megatron"] = "--fast_only"
        theirs = [(kind, name) for kind, name in (("megatron", "Megatron preprocess_data.py"),
                  ("fast", "Megatron preprocess_data_fast.py")) if kind not in skipped]  # fmt: skip
        cases = [  # (title, Megatron's input and --json-keys, ours: first the one ratios refer to)
            ("1 view", "text.jsonl", ("text",), [Tool("ours --views text", "text.jsonl", ("text",), "ours")]),
            ("2 views", "flat.jsonl", ("user", "assistant"), [  # (the same file first)
                Tool("ours --views user,assistant", "flat.jsonl", ("user,assistant",), "ours"),
                Tool("ours --views messages (chat file)", "chat.jsonl", ("messages",), "ours")]),
        ]  # fmt: skip
        print(f"cpus: {os.cpu_count()}; Megatron's tools run with {args.python}; runs (wall, cpu):")
        tables = []
        for title, data, keys, ours in cases:
            tools = ours + [Tool(name, data, keys, kind) for kind, name in theirs]
            for workers in (int(w) for w in args.workers.split(",")):
                runs = measure(tools, megatron, args.python, work, tok, workers, args.rounds)
                tables.append((f"{title} ({data}), {workers} worker(s)", runs,
                               (work / data).stat().st_size / 1e6))  # fmt: skip
        for table in tables:
            report(*table)


if __name__ == "__main__":
    main()
