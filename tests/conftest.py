"""Shared fixtures: a tokenizer trained on the bundled corpus and its shards, built once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "nlrx_synth"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_module(module: str, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Runs `python -m module args` as a user would; returns the completed process."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, **kw)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat(user: str, assistant: str, system: str = "Convert.") -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}  # fmt: skip


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from data_pipeline.sources import iter_view_texts
    from data_pipeline.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(iter_view_texts(str(BUNDLED / "train.jsonl"), "messages"), out, vocab_size=1000)
    return out


@pytest.fixture(scope="session")
def bundled_shards(tmp_path_factory, tokenizer_dir) -> Path:
    from data_pipeline.preprocess import preprocess

    out = tmp_path_factory.mktemp("shards") / "nlrx"
    preprocess(str(BUNDLED / "train.jsonl"), "messages", str(tokenizer_dir), str(out),
               num_workers=1, shard_bytes=400_000, val_fraction=0.05, progress=False)  # fmt: skip
    return out
