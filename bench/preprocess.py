"""Preprocessing throughput, side by side in one run: our pipeline with 1 and 2 workers against a
naive baseline (`datasets.map` with the same Hugging Face tokenizer) on the same input.

    python bench/preprocess.py [--repeat 8] [--vocab_size 2000]
    python bench/preprocess.py --against HEAD~3 --corpus mixed --repeat 5 --rounds 3

Prints tokens/s for each and the ratios to the baseline. The input is the bundled NL-RX-SYNTH
train set repeated `--repeat` times (one JSONL file); `--corpus mixed`: the four bundled chat sets
(NL-RX-SYNTH, Spider, Rotten Tomatoes, NQ-Open; 8.6 MB), each repeat after the first with the words
of every view shuffled, so that texts do not simply repeat (a tokenizer cache would flatter it).

`--against REV` compares this checkout's pipeline with the one at git revision REV instead (before
/ after a change): the same input, 1 and 2 workers, the two alternated `--rounds` times, each run in
a fresh interpreter and timed around `preprocess()` after a warm-up call on 20 lines (start-up:
imports and tokenizer loading excluded; starting the workers included).
Prints wall and CPU seconds (workers included) of every run and the median after/before ratios;
on a loaded machine the CPU ratio is the steadier one. Numbers go to docs/LOG.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data_pipeline.preprocess import preprocess  # noqa: E402
from data_pipeline.sources import iter_view_texts  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "nlrx_synth" / "train.jsonl"
MIXED = [REPO / "data" / name / "train.jsonl" for name in ("nlrx_synth", "spider", "rotten_tomatoes", "nq_open")]  # fmt: skip


def baseline(path: Path, tok_dir: Path, cache: Path) -> tuple[int, float]:
    """What one writes without a pipeline: load_dataset + map(tokenize) over the same views."""
    import datasets

    datasets.disable_progress_bars()
    tok = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))

    def tokenize(batch):
        users = [next(m["content"] for m in ms if m["role"] == "user") for ms in batch["messages"]]
        answers = [
            next(m["content"] for m in ms if m["role"] == "assistant") for ms in batch["messages"]
        ]
        return {
            "user_ids": tok(users, add_special_tokens=False)["input_ids"],
            "assistant_ids": tok(answers, add_special_tokens=False)["input_ids"],
        }

    out = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    out.save_to_disk(str(cache / "saved"))
    dt = time.perf_counter() - t0
    tokens = sum(len(a) + len(b) for a, b in zip(out["user_ids"], out["assistant_ids"]))
    return tokens, dt


def ours(path: Path, tok_dir: Path, out: Path, workers: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    m = preprocess(str(path), "messages", str(tok_dir), str(out), num_workers=workers,
                   shard_bytes=4 << 20, val_fraction=0.05, progress=False)  # fmt: skip
    dt = time.perf_counter() - t0
    return sum(s["tokens"] for s in m["shards"]), dt


def write_corpus(path: Path, corpus: str, repeat: int) -> list[Path]:
    """Writes the input; returns the files the tokenizer is trained on."""
    sources = [BUNDLED] if corpus == "nlrx" else MIXED
    if missing := [str(s) for s in sources if not s.exists()]:
        sys.exit(f"--corpus {corpus}: missing {', '.join(missing)}")
    rng = random.Random(0)
    with open(path, "w") as f:
        for r in range(repeat):
            for src in sources:
                if r == 0 or corpus == "nlrx":
                    f.write(src.read_text())
                    continue
                for line in src.read_text().splitlines():
                    record = json.loads(line)
                    for m in record["messages"][1:]:
                        words = m["content"].split(" ")
                        rng.shuffle(words)
                        m["content"] = " ".join(words)
                    f.write(json.dumps(record) + "\n")
    return sources


# Runs in a fresh interpreter with the pipeline under test first on sys.path. A first call on the
# input's first 20 lines takes the start-up (imports, tokenizer loading) out of the timed call.
TIMED_RUN = """
import json, resource, shutil, sys, time
sys.path.insert(0, sys.argv[1])
from data_pipeline.preprocess import preprocess
def cpu():
    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
inp, tok, out, workers = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
with open(inp) as f, open(out + ".warm.jsonl", "w") as w:
    w.writelines(line for _, line in zip(range(20), f))
preprocess(out + ".warm.jsonl", "messages", tok, out + ".warm", progress=False)
shutil.rmtree(out + ".warm")
t, c = time.perf_counter(), cpu()
m = preprocess(inp, "messages", tok, out, num_workers=workers, val_fraction=0.05, progress=False)
print(json.dumps({"wall_s": time.perf_counter() - t, "cpu_s": cpu() - c,
                  "tokens": sum(s["tokens"] for s in m["shards"])}))
"""


def timed_run(code_root: Path, data: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", TIMED_RUN, str(code_root), str(data), str(tok_dir),
                           str(out), str(workers)], capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"{code_root}: {proc.stderr[-2000:]}")
    shutil.rmtree(out)
    return json.loads(proc.stdout.splitlines()[-1])


def against(rev: str, data: Path, tok_dir: Path, tmp: Path, rounds: int) -> None:
    """This checkout's pipeline after the one at `rev`, alternated, 1 and 2 workers."""
    before = tmp / "before"
    before.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "data_pipeline"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    codes = {"before": before, "after": REPO}
    print(f"{'workers':>7} {'round':>5} {'code':>6} {'tokens':>10} {'wall s':>8} {'cpu s':>8}")
    for workers in (1, 2):
        runs = {name: [] for name in codes}
        for r in range(rounds):
            order = list(codes) if r % 2 == 0 else list(codes)[::-1]
            for name in order:
                res = timed_run(codes[name], data, tok_dir, tmp / "out", workers)
                runs[name].append(res)
                print(f"{workers:>7} {r:>5} {name:>6} {res['tokens']:>10,} {res['wall_s']:>8.2f} "
                      f"{res['cpu_s']:>8.2f}", flush=True)  # fmt: skip
        assert runs["before"][0]["tokens"] == runs["after"][0]["tokens"]
        for key in ("wall_s", "cpu_s"):
            ratios = [b[key] / a[key] for b, a in zip(runs["before"], runs["after"])]
            print(f"speed-up after/before, {workers} worker{'s' * (workers > 1)}, {key[:-2]}: "
                  f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--vocab_size", type=int, default=2000)
    ap.add_argument("--corpus", choices=("nlrx", "mixed"), default="nlrx")
    ap.add_argument("--against", metavar="REV", help="compare with the pipeline at git REV")
    ap.add_argument("--rounds", type=int, default=3, help="A/B alternations, with --against")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "input.jsonl"
        sources = write_corpus(data, args.corpus, args.repeat)
        tok_dir = tmp / "tok"
        train_tokenizer(
            iter_view_texts([str(s) for s in sources], "messages"), tok_dir,
            vocab_size=args.vocab_size,
        )  # fmt: skip
        mb = data.stat().st_size / 1e6
        n_records = sum(1 for _ in open(data))
        print(f"input: {mb:.1f} MB, {n_records} records; cpus: {os.cpu_count()}")
        if args.against:
            against(args.against, data, tok_dir, tmp, args.rounds)
            return
        results = {"baseline datasets.map": baseline(data, tok_dir, tmp / "hf")}
        for w in (1, 2):
            results[f"ours, {w} worker{'s' * (w > 1)}"] = ours(data, tok_dir, tmp / f"o{w}", w)
            shutil.rmtree(tmp / f"o{w}")
        base_tps = results["baseline datasets.map"][0] / results["baseline datasets.map"][1]
        print(f"{'method':<24}{'tokens':>12}{'seconds':>10}{'tokens/s':>14}{'× baseline':>12}")
        for name, (tokens, dt) in results.items():
            print(
                f"{name:<24}{tokens:>12,}{dt:>10.2f}{tokens / dt:>14,.0f}{tokens / dt / base_tps:>12.2f}"
            )


if __name__ == "__main__":
    main()
