"""The paper's fine-tuning protocol at CPU scale: `python -m pretrain.experiments.finetune`.

The LLM-JEPA paper's largest gains are in fine-tuning a pretrained LM (NL-RX-SYNTH, Llama-3.2-1B:
57.29 → 71.46 exact match). This experiment reproduces that protocol with our engine:
  1. a SentencePiece tokenizer (2000 tokens) on the training views of every bundled two-view
     corpus: data/nlrx_synth, data/rotten_tomatoes, data/spider, data/nq_open (GSM8K ships only a
     test split, so nothing of it is trained on)
  2. one LM-only base (`jepa.objective=none`), pretrained from random init on the three corpora
     other than NL-RX-SYNTH, then exported to Hugging Face format (out/base/hf)
  3. `pretrain.experiments.nlrx` with that tokenizer and `model.init_from=out/base/hf`: every arm
     and seed fine-tunes the same base on NL-RX-SYNTH, LM only against LLM-JEPA, paired by seed

Everything is reused when present, so a call with more arms trains only those. --quick: a base of
30 steps and the nlrx --quick grid (the pipeline, not the gap).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pretrain.experiments import nlrx
from pretrain.export import export

REPO = nlrx.REPO
BASE_CORPORA = ("rotten_tomatoes", "spider", "nq_open")


def prepare_base(out: Path, steps: int, overrides: tuple[str, ...], threads: int) -> Path:
    """Tokenizer, base shards, the LM-only base run and its export; returns the export folder."""
    py = sys.executable
    tok, shards, run_dir = out / "tokenizer", out / "base_shards", out / "base"
    corpora = [REPO / "data" / "nlrx_synth" / "train.jsonl"] + [
        REPO / "data" / name / "train.jsonl" for name in BASE_CORPORA
    ]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a world of one
        env.pop(var, None)
    if not (tok / "tokenizer.json").exists():
        nlrx._run([py, "-m", "data_pipeline.tokenizer", "train", "--inputs", *map(str, corpora),
                   "--views", "messages", "--out", str(tok), "--vocab_size", "2000"],
                  out / "tokenizer.log", env)  # fmt: skip
    if not (shards / "manifest.json").exists():
        nlrx._run([py, "-m", "data_pipeline.preprocess", "--inputs", ",".join(map(str, corpora[1:])),
                   "--views", "messages", "--tokenizer", str(tok), "--out", str(shards),
                   "--num_workers", "1", "--val_fraction", "0.02", "--progress", "false"],
                  out / "base_preprocess.log", env)  # fmt: skip
    hf = run_dir / "hf"
    if not (hf / "config.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        nlrx._run([py, str(REPO / "pretrain" / "main.py"), str(nlrx.RECIPE),
                   f"data.paths=[{shards}]", f"run_dir={run_dir}", "seed=1",
                   "jepa.objective=none", "data.records_per_row=0",
                   f"schedule.train_steps={steps}", f"schedule.warmup_steps={max(1, steps // 20)}",
                   *overrides],
                  run_dir / "train.log", env)  # fmt: skip
        export(run_dir, hf)
    return hf


def main(
    out: str = "runs/nlrx_finetune",
    grid: str = "2:3",
    seeds: str = ",".join(map(str, nlrx.SEEDS)),
    base_steps: int = 1500,
    steps: int = 600,
    limit: int = 0,
    parallel: int = 2,
    quick: bool = False,
    base_overrides: str = "",
    overrides: str = "",
    split: str = "test",
    baseline: str = "lm",
) -> dict:
    """Base, then the NL-RX-SYNTH fine-tuning arms, into OUT; see the module docstring.
    base_overrides: dotted config overrides of the base run (its model size, for one), kept by
    every fine-tuning run (the run's transformers config is the base's with the recipe's
    model.overrides applied); overrides: of every fine-tuning run (e.g. optim.lr=1e-3)."""
    out_dir = Path(out).resolve()
    nlrx.eval_data(out_dir, split)  # a bad --split fails before any training
    if quick:
        base_steps = 30
    hf = prepare_base(
        out_dir, base_steps, tuple(str(base_overrides).split()), max(1, os.cpu_count() or 1)
    )
    print(f"[finetune] base: {hf}", flush=True)
    summary = nlrx.main(
        out=str(out_dir), grid=grid, seeds=seeds, steps=steps, limit=limit, parallel=parallel,
        quick=quick, overrides=f"{base_overrides} {overrides}", split=split, baseline=baseline,
        tokenizer=str(out_dir / "tokenizer"), init_from=str(hf),
    )  # fmt: skip
    base_eval = nlrx._metrics(out_dir / "base", "eval")
    summary["base"] = {"steps": base_steps, "val_loss_lm": base_eval[-1].get("eval/loss_lm")}
    suffix = "" if split == "test" else f"_{split}"
    (out_dir / f"summary{suffix}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    import fire

    try:
        fire.Fire(main, serialize=lambda _summary: None)  # the summary is printed as a table
    except RuntimeError as e:
        sys.exit(f"pretrain.experiments.finetune: error: {e}")
