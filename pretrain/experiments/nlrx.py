"""NL-RX-SYNTH from scratch, LM-only against LLM-JEPA: `python -m pretrain.experiments.nlrx`.

The paper's pretraining protocol at CPU scale, in one command:
  1. a SentencePiece tokenizer (1000 tokens) on the training views, shards of data/nlrx_synth/train
  2. per arm and seed, a run of recipes/nlrx_cpu.yaml from random init (one process, our engine:
     DeepSpeed ZeRO-3 in a world of one). Arms: `lm` (λ = 0: the JEPA term is computed and logged,
     never trained on) and LLM-JEPA arms `l{λ}_k{k}`. A seed fixes the init and the data order, and
     4 records per row fix the LM tokens of every step, so the arms differ only by the JEPA term
  3. export, then `pretrain.evaluate` on data/nlrx_synth/test.jsonl (greedy generation of the regex
     from the description: prefix/exact match; the representation metrics)
  4. summary.md / summary.json: mean ± std per arm, each JEPA arm's paired difference to `lm` over
     seeds with a one-tailed paired t-test (H1: JEPA > LM); loss_curves.png, singular_values.png

Grid items: `λ:k` (LLM-JEPA), `λ:k:variant` (a key of VARIANTS, e.g. `2:3:sigreg`), with `@β` for
the regularizer weight (`2:3:sigreg@0.3`), and `lm@F`: LM only trained F × the steps (the
same-compute comparison; `--baseline lm_xF` pairs every arm with it). --split valid scores the
same runs on valid.jsonl, the training records the preprocessing split holds out: settings are
chosen there, and test is kept for the final numbers. --tokenizer and --init_from start every run
from a pretrained model (pretrain.experiments.finetune).

Runs run `--parallel` at a time, each on its share of the cores. Finished runs (eval.json present)
are kept, so an interrupted experiment continues where it stopped, and a call with more arms
trains only those; --reevaluate evaluates the exported runs again (after a change to the
evaluator). --quick: 2 arms × 2 seeds of 30 steps, 100 test pairs: checks that everything runs,
not the size of any gap.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.preprocess import is_validation
from data_pipeline.sources import ViewSpec
from pretrain.evaluate import evaluate
from pretrain.export import export

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "nlrx_synth"
RECIPE = REPO / "recipes" / "nlrx_cpu.yaml"
SEEDS = (82, 23, 37, 84, 4)
# The preprocessing split's validation share: 168 of the 8,000 training records, where settings
# are chosen (valid.jsonl); NL-RX-SYNTH test is kept for the final numbers.
VAL_FRACTION = 0.02
# (λ, k): the paper's pretraining setting λ = 2, k = 3, and its neighbours on each axis.
GRID = ((2.0, 3), (1.0, 3), (4.0, 3), (2.0, 1))
_IN_PROCESS = threading.Lock()
METRICS = (
    "prefix_match", "exact_match", "val_loss_lm", "cosine", "cosine_shuffled", "cosine_b_b",
    "pred_cosine", "pred_cosine_shuffled", "lstsq_residual", "lstsq_residual_relative",
    "lstsq_residual_centered", "effective_rank",
)  # fmt: skip


# Named variants of a JEPA arm (grid item λ:k:variant): what each changes, as config overrides.
VARIANTS = {
    "paper": ("jepa.readout=paper",),
    "sigreg": ("jepa.regularizer=sigreg",),
    "vicreg": ("jepa.regularizer=vicreg",),
    "paper_sigreg": ("jepa.readout=paper", "jepa.regularizer=sigreg"),
    "paper_vicreg": ("jepa.readout=paper", "jepa.regularizer=vicreg"),
    "mid": ("jepa.hidden_layer=2",),
}


@dataclass(frozen=True)
class Arm:
    weight: float  # λ; 0 = LM only
    k: int
    variant: str = ""  # a key of VARIANTS, or "" for the defaults
    beta: float | None = None  # jepa.regularizer_weight, when the grid item gives one (`@β`)
    steps_factor: float = 1.0  # an LM-only arm trained this many times the steps (same FLOPs)

    @property
    def name(self) -> str:
        if self.weight == 0:
            return "lm" if self.steps_factor == 1 else f"lm_x{self.steps_factor:g}"
        beta = "" if self.beta is None else f"_b{self.beta:g}"
        return f"l{self.weight:g}_k{self.k}" + (f"_{self.variant}" if self.variant else "") + beta

    @property
    def label(self) -> str:
        if self.weight == 0:
            return "LM only" + ("" if self.steps_factor == 1 else f", {self.steps_factor:g}× steps")
        beta = "" if self.beta is None else f" β={self.beta:g}"
        return (
            f"LLM-JEPA λ={self.weight:g} k={self.k}"
            + (f" {self.variant}" if self.variant else "")
            + beta
        )

    @property
    def overrides(self) -> tuple[str, ...]:
        beta = () if self.beta is None else (f"jepa.regularizer_weight={self.beta}",)
        return (VARIANTS[self.variant] if self.variant else ()) + beta

    def steps(self, base: int) -> int:
        return round(base * self.steps_factor)


def parse_arms(grid: str) -> list[Arm]:
    """ "2:3,1:3,2:3:sigreg@0.3,lm@1.47" → LM + those arms: (λ, k[, variant[@β]]) JEPA arms, and
    `lm@F` an LM-only arm trained F × the steps (the same-FLOP comparison)."""
    arms = [Arm(0.0, 1)]
    for item in filter(None, grid.split(",")):
        if item.startswith("lm@"):
            arms.append(Arm(0.0, 1, steps_factor=float(item[3:])))
            continue
        lam, k, *variant = item.split(":")
        name, _, beta = (variant[0] if variant else "").partition("@")
        if name and name not in VARIANTS:
            raise RuntimeError(f"unknown variant {name!r} in --grid (known: {', '.join(VARIANTS)})")
        arms.append(Arm(float(lam), int(k), name, float(beta) if beta else None))
    return arms


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{' '.join(cmd[:4])} … exited {proc.returncode} (log {log}):\n{tail}")


def prepare(out: Path, tokenizer: str = "") -> Path:
    """Tokenizer (trained, or the given one), shards and the validation pairs (valid.jsonl: the
    training records the preprocessing split holds out) under out/; reused when present."""
    py = sys.executable
    tok, shards = (Path(tokenizer) if tokenizer else out / "tokenizer"), out / "shards"
    if not (tok / "tokenizer.json").exists():
        _run([py, "-m", "data_pipeline.tokenizer", "train", "--inputs", str(DATA / "train.jsonl"),
              "--views", "messages", "--out", str(tok), "--vocab_size", "1000"],
             out / "tokenizer.log", os.environ.copy())  # fmt: skip
    if not (shards / "manifest.json").exists():
        _run([py, "-m", "data_pipeline.preprocess", "--inputs", str(DATA / "train.jsonl"),
              "--views", "messages", "--tokenizer", str(tok), "--out", str(shards),
              "--num_workers", "1", "--val_fraction", str(VAL_FRACTION), "--progress", "false"],
             out / "preprocess.log", os.environ.copy())  # fmt: skip
    valid = out / "valid.jsonl"
    if not valid.exists():
        spec = ViewSpec.parse("messages")
        lines = (DATA / "train.jsonl").read_text().splitlines(keepends=True)
        held = [ln for ln in lines if is_validation(spec.extract(json.loads(ln)), VAL_FRACTION)]
        valid.write_text("".join(held))
    return shards


def eval_data(out: Path, split: str) -> Path:
    """The pairs a split is scored on: NL-RX-SYNTH test, or the held-out training records."""
    if split not in ("test", "valid"):
        raise RuntimeError(f"--split must be test or valid, got {split!r}")
    return DATA / "test.jsonl" if split == "test" else out / "valid.jsonl"


def run_one(
    arm: Arm, seed: int, out: Path, shards: Path, steps: int, limit: int, threads: int,
    reevaluate: bool = False, extra: tuple[str, ...] = (), split: str = "test",
) -> dict:  # fmt: skip
    """Train, export, evaluate one (arm, seed); returns the evaluation of `split` (cached in
    eval.json for test, eval_valid.json for valid). reevaluate: evaluate an exported run again
    (after a change to the evaluator); extra: dotted config overrides of every run."""
    run_dir = out / "runs" / f"{arm.name}_s{seed}"
    hf = run_dir / "hf"
    result = run_dir / ("eval.json" if split == "test" else f"eval_{split}.json")
    if result.exists() and not (reevaluate and (hf / "config.json").exists()):
        return json.loads(result.read_text())
    if not (hf / "config.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a world of one each
            env.pop(var, None)
        _run([sys.executable, str(REPO / "pretrain" / "main.py"), str(RECIPE),
              f"data.paths=[{shards}]", f"run_dir={run_dir}", f"seed={seed}",
              f"jepa.weight={arm.weight}", f"jepa.predictor_tokens={arm.k}",
              f"schedule.train_steps={arm.steps(steps)}",
              f"schedule.warmup_steps={max(1, arm.steps(steps) // 20)}",
              *arm.overrides, *extra],
             run_dir / "train.log", env)  # fmt: skip
    # Export + evaluate in this process, one run at a time (no second torch start-up); their
    # output goes to the run's eval.log (sys.stdout is swapped: the driver prints to `console`).
    log_name = "eval.log" if split == "test" else f"eval_{split}.log"
    with _IN_PROCESS, open(run_dir / log_name, "w") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            if not (hf / "config.json").exists():
                export(run_dir, hf)
            r = evaluate(hf, str(eval_data(out, split)), predictor_tokens=arm.k, limit=limit,
                         top_singular=64, progress=False)  # fmt: skip
    result.write_text(json.dumps(r, indent=1) + "\n")
    return r


def final_eval_scalars(run_dir: Path) -> dict:
    """The engine's last validation scalars: LM loss and the effective rank of the embeddings."""
    rows = _metrics(run_dir, "eval")
    last = rows[-1] if rows else {}
    return {
        "val_loss_lm": last.get("eval/loss_lm"),
        "effective_rank": last.get("repr/effective_rank"),
    }


# ----------------------------------------------------------------------------- statistics


def paired_test(jepa: list[float], lm: list[float]) -> dict:
    """Paired one-tailed t-test over seeds, H1: mean(jepa − lm) > 0."""
    from scipy import stats

    d = np.asarray(jepa) - np.asarray(lm)
    res = {"mean_diff": float(d.mean()), "std_diff": float(d.std(ddof=1)) if len(d) > 1 else 0.0}
    if len(d) > 1 and np.any(d != d[0]):
        t = stats.ttest_rel(jepa, lm, alternative="greater")
        res.update(t=float(t.statistic), p_one_tailed=float(t.pvalue))
    else:  # no variation: the t statistic is undefined
        res.update(t=None, p_one_tailed=None)
    return res


def summarize(results: dict[Arm, dict[int, dict]], seeds: list[int], baseline: str = "lm") -> dict:
    """Mean ± std per arm and metric; every other arm's accuracy paired with the baseline arm's."""
    arms = list(results)
    by_name = {a.name: a for a in arms}
    if baseline not in by_name:
        raise RuntimeError(f"--baseline {baseline!r} is not an arm (arms: {', '.join(by_name)})")
    lm = by_name[baseline]
    summary = {"seeds": seeds, "baseline": baseline, "arms": {}}
    for arm in arms:
        per_metric = {}
        for m in METRICS:
            vals = [results[arm][s].get(m) for s in seeds]
            if any(v is None for v in vals):
                continue
            entry = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                     "values": vals}  # fmt: skip
            if arm != lm and m in ("prefix_match", "exact_match"):
                entry["vs_lm"] = paired_test(vals, [results[lm][s][m] for s in seeds])
            per_metric[m] = entry
        spectra = np.array([results[arm][s]["singular_values"] for s in seeds])
        summary["arms"][arm.name] = {
            "label": arm.label, "weight": arm.weight, "predictor_tokens": arm.k,
            "overrides": list(arm.overrides),
            "metrics": per_metric, "singular_values_mean": spectra.mean(0).tolist(),
        }  # fmt: skip
    return summary


def _pm(entry: dict | None, fmt: str) -> str:
    return "–" if entry is None else f"{entry['mean']:{fmt}} ± {entry['std']:{fmt}}"


def markdown(summary: dict, meta: dict) -> str:
    base = next(a["label"] for n, a in summary["arms"].items() if n == summary["baseline"])
    head = (
        f"NL-RX-SYNTH {meta.get('split', 'test')} ({meta['pairs']} pairs), {meta['steps']} steps, "
        f"seeds {summary['seeds']}; mean ± std over seeds; Δ: paired difference to {base}, p: "
        f"one-tailed paired t-test (H1: the arm > {base})."
        + (f" Every run with {' '.join(meta['overrides'])}." if meta.get("overrides") else "")
    )
    acc = ["| arm | prefix match % | Δ prefix | p | exact match % | Δ exact | p | val LM loss |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rep = ["| arm | cos(Enc A, Enc B) | cos(Pred, Enc B) | shuffled | cos(Enc B, Enc B') "
           "| lstsq residual | affine residual / spread | effective rank |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for a in summary["arms"].values():
        m = a["metrics"]
        cells = []
        for name in ("prefix_match", "exact_match"):
            vs = m[name].get("vs_lm")
            p = None if vs is None else vs["p_one_tailed"]
            cells += [_pm(m[name], ".2f"),
                      "–" if vs is None else f"{vs['mean_diff']:+.2f} ± {vs['std_diff']:.2f}",
                      "–" if p is None else f"{p:.3g}"]  # fmt: skip
        acc.append(f"| {a['label']} | {' | '.join(cells)} | {_pm(m.get('val_loss_lm'), '.4f')} |")
        rep.append(
            f"| {a['label']} | {_pm(m['cosine'], '.3f')} | {_pm(m.get('pred_cosine'), '.4f')} | "
            f"{_pm(m.get('pred_cosine_shuffled'), '.4f')} | {_pm(m.get('cosine_b_b'), '.4f')} | "
            f"{_pm(m['lstsq_residual'], '.3g')} | {_pm(m.get('lstsq_residual_centered'), '.3f')} | "
            f"{_pm(m.get('effective_rank'), '.1f')} |"
        )
    return "\n".join([head, "", *acc, "", *rep]) + "\n"


# ----------------------------------------------------------------------------- plots


def _metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def plot(
    out: Path, arms: list[Arm], seeds: list[int], summary: dict, suffix: str = ""
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        curves = [_metrics(out / "runs" / f"{arm.name}_s{s}") for s in seeds]
        steps = [r["step"] for r in curves[0]]
        for ax, key in zip(axes, ("loss/lm", "loss/jepa")):
            vals = np.array([[r.get(key, np.nan) for r in c] for c in curves])
            ax.plot(steps, np.nanmean(vals, 0), label=arm.label, lw=2 if arm.weight == 0 else 1.2)
    axes[0].set(title="LM loss (train, mean over seeds)", xlabel="step", yscale="log")
    axes[1].set(title="JEPA term d(Pred(Enc A), Enc B)\n(logged, not trained on, in the LM arm)",
                xlabel="step", yscale="log")  # fmt: skip
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    curves_png = out / "loss_curves.png"  # training curves: the same whatever the split
    fig.savefig(curves_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        sv = summary["arms"][arm.name]["singular_values_mean"]
        ax.plot(range(1, len(sv) + 1), sv, label=arm.label, lw=2 if arm.weight == 0 else 1.2)
    ax.set(title="Singular values of Enc(A) − Enc(B) (test, mean over seeds)", xlabel="index",
           ylabel="singular value", yscale="log")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    spectra_png = out / f"singular_values{suffix}.png"
    fig.savefig(spectra_png, dpi=120)
    plt.close(fig)
    return [curves_png, spectra_png]


# ----------------------------------------------------------------------------- driver


def main(
    out: str = "runs/nlrx",
    grid: str = ",".join(f"{lam:g}:{k}" for lam, k in GRID),
    seeds: str = ",".join(map(str, SEEDS)),
    steps: int = 600,
    limit: int = 0,
    parallel: int = 2,
    quick: bool = False,
    reevaluate: bool = False,
    overrides: str = "",
    split: str = "test",
    baseline: str = "lm",
    tokenizer: str = "",
    init_from: str = "",
) -> dict:
    """Runs the whole experiment into OUT; see the module docstring. split: score on NL-RX-SYNTH
    test or on the validation records (choose settings on valid, report test); baseline: the arm
    the others are paired with; tokenizer: use this tokenizer instead of training one;
    init_from: start every run from this Hugging Face model (fine-tuning)."""
    if quick:
        grid, seeds, steps, limit = "2:3", "82,23", 30, 100
    arms = parse_arms(str(grid))
    seed_list = [int(s) for s in str(seeds).split(",") if s]
    extra = tuple(str(overrides).split())  # e.g. "model.overrides.hidden_size=128 optim.lr=1e-3"
    if init_from:
        extra += (f"model.init_from={Path(init_from).resolve()}",)
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_data(out_dir, split)  # a bad --split fails before any training
    t0 = time.perf_counter()
    shards = prepare(out_dir, tokenizer)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    jobs = [(arm, s) for s in seed_list for arm in arms]  # seed-major: pairs finish together
    print(f"[nlrx] {len(arms)} arms × {len(seed_list)} seeds, {steps} steps each, "
          f"{parallel} at a time × {threads} thread(s) → {out_dir}", flush=True)  # fmt: skip

    console = sys.stdout  # run_one swaps sys.stdout while it evaluates

    def job(arm_seed):
        arm, seed = arm_seed
        t = time.perf_counter()
        r = run_one(arm, seed, out_dir, shards, steps, limit, threads, reevaluate, extra, split)
        print(f"[nlrx] {arm.name} seed {seed}: prefix {r['prefix_match']:.2f} exact "
              f"{r['exact_match']:.2f} cos {r['cosine']:.4f} ({time.perf_counter() - t:.0f} s)", file=console, flush=True)  # fmt: skip
        return r

    with ThreadPoolExecutor(parallel) as pool:
        evals = list(pool.map(job, jobs))
    results: dict[Arm, dict[int, dict]] = {arm: {} for arm in arms}
    for (arm, seed), r in zip(jobs, evals):
        results[arm][seed] = {**r, **final_eval_scalars(out_dir / "runs" / f"{arm.name}_s{seed}")}
    summary = summarize(results, seed_list, baseline)
    meta = {"steps": steps, "pairs": evals[0]["pairs"], "minutes": (time.perf_counter() - t0) / 60,
            "recipe": str(RECIPE.relative_to(REPO)), "overrides": list(extra), "quick": quick,
            "split": split}  # fmt: skip
    summary["meta"] = meta
    suffix = "" if split == "test" else f"_{split}"
    (out_dir / f"summary{suffix}.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown(summary, meta)
    (out_dir / f"summary{suffix}.md").write_text(table)
    pngs = plot(out_dir, arms, seed_list, summary, suffix)
    print(table)
    print(
        f"[nlrx] done in {meta['minutes']:.1f} min: {out_dir / f'summary{suffix}.md'}, "
        + ", ".join(str(p) for p in pngs)
    )
    return summary


if __name__ == "__main__":
    import fire

    try:
        fire.Fire(main, serialize=lambda _summary: None)  # the summary is printed as a table
    except RuntimeError as e:
        sys.exit(f"pretrain.experiments.nlrx: error: {e}")
