"""Preprocessing throughput, side by side in one run: our pipeline with 1 and 2 workers against a
naive baseline (`datasets.map` with the same Hugging Face tokenizer) on the same input.

    python bench/preprocess.py [--repeat 8] [--vocab_size 2000]

Prints tokens/s for each and the ratios to the baseline. The input is the bundled NL-RX-SYNTH
train set repeated `--repeat` times (one JSONL file). Numbers go to docs/LOG.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data_pipeline.preprocess import preprocess  # noqa: E402
from data_pipeline.sources import iter_view_texts  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "nlrx_synth" / "train.jsonl"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--vocab_size", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "input.jsonl"
        with open(data, "wb") as f:
            for _ in range(args.repeat):
                f.write(BUNDLED.read_bytes())
        tok_dir = tmp / "tok"
        train_tokenizer(
            iter_view_texts(str(BUNDLED), "messages"), tok_dir, vocab_size=args.vocab_size
        )
        mb = data.stat().st_size / 1e6
        print(f"input: {mb:.1f} MB, {args.repeat * 8000} records; cpus: {os.cpu_count()}")
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
