"""The engine measured on one GPU: throughput, MFU and peak memory of LM-only and LLM-JEPA steps,
and the gradient-accumulation parity check, in one command (about 5 minutes on one H100/H200).

    python bench/gpu_check.py [--out gpu_check.json] [--presets 125m,1b] [--steps 10] [--warmup 3]
    python bench/gpu_check.py --quick --device cpu        # CI: tiny model, fp32, ~1 minute

Settings (full run): size presets 125m and 1b (pretrain/model.py) from their recipes
(recipes/llama_125m.yaml, recipes/llama_1b.yaml: bf16 ZeRO-3 ds_configs/zero3_bf16.json,
activation checkpointing as each recipe has it: off for 125m, on for 1b), world size 1,
model.attn_implementation=flex_attention, rows of 4096 tokens, micro-batches of 8 (125m) or 4 (1b)
rows, one micro-batch per step, a Llama-3-size vocabulary (128,256), PyTorch AdamW.
--quick: the tiny preset, fp32 ZeRO-3 (ds_configs/zero3_cpu.json), sdpa, rows of 128 tokens,
micro-batches of 2 rows, a vocabulary of 1,000; no MFU on a CPU (null).

Data: no 128k-vocab tokenizer is needed. Synthetic two-view shards are written with the project's
own shard writer and manifest builder (data_pipeline.shards.ShardWriter,
data_pipeline.preprocess.build_manifest): uniformly random token ids, view lengths log-normal
(median 80, clipped to 20..400 tokens; --quick: median 10, 4..40), so a packed row holds many
records. Special ids are those a trained tokenizer gets (data_pipeline/tokenizer.py); the manifest
names a tokenizer folder that does not exist (the trainer copies it only when it does).

Cases. Each (preset, mode) runs in a fresh subprocess of this script (the hidden --case flag), so
that GPU memory and DeepSpeed state are isolated and a failing case (out of memory, a timeout) is
reported in the table instead of ending the run:

    lm        jepa.objective=none: LM-only rows
    jepa      LLM-JEPA k=1 (jepa.objective=jepa, predictor_tokens=1, no loss dropout)

Both modes read the same record stream (same seed) with full rows, so a JEPA step holds fewer
records than an LM step. A case drives the engine through the project's code, as trainer.loop does:
load_config → trainer.setup → trainer.start_inputs → per step run.inputs.next() +
trainer.train_step, timed with torch.cuda.synchronize() on both sides, then trainer.log_step (not
timed), whose `tokens_per_s/total` (non-padding tokens), `tokens_per_s/lm` and `mfu` (CUDA only:
pretrain.metrics.training_flops over peak_flops_per_s; activation recomputation is not counted)
are reported as medians over the timed steps. The first --warmup steps (flex_attention and the
compiled block mask compile there) are not timed; the peak memory is
torch.cuda.max_memory_allocated over the timed steps (reset after the warm-up).

    JEPA/LM time per LM token  = LM-only tokens_per_s/lm ÷ JEPA tokens_per_s/lm: what adding the JEPA
                                 term costs per unit of LM data; next to it the token ratio
                                 (non-padding tokens per LM token, JEPA ÷ LM), its ideal value
    JEPA/LM step time          = median step time ratio (rows are full in both modes)

Parity (one more subprocess, on the first preset: 125m; --quick: tiny): the trainer's step over
the same N JEPA rows as 1 micro-batch of N rows and as N micro-batches of 1 row, N = the preset's
micro-batch rows but at least 4 (8 for 125m, 4 for tiny), bf16 with fp32 gradient accumulation in
the full run, fp32 in --quick. trainer.train_step runs unchanged; the engine's
step() is wrapped to read every parameter's full gradient (deepspeed.utils.safe_get_full_grad) at
the accumulation boundary, before the optimizer update. Reported: max abs diff and relative L2
diff of the concatenated gradients; pass if the relative L2 diff ≤ 1e-2.

Output: one table on stdout, and the same as JSON (--out) with the device name, the torch /
transformers / deepspeed versions and the date. Exit status 0 when every case ran and parity
passed, 1 otherwise, 2 for a usage error (e.g. --device cuda without CUDA).
TORCH_EXTENSIONS_DIR, TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR default to folders under the
system temp dir (kept between runs, shared by the cases: later cases reuse compiled kernels).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("lm", "jepa")
PARITY_MIN_ROWS = 4  # at least; the preset's micro-batch rows when more (kernels already compiled)
PARITY_MAX_REL_L2 = 1e-2

# Per preset: its recipe and rows per micro-batch at 4096 tokens (125m: the recipe's 16 rows of
# 2048 tokens, as 8 of 4096; 1b: the recipe's 4).
PRESETS = {
    "125m": {"recipe": "recipes/llama_125m.yaml", "micro_batch_rows": 8},
    "1b": {"recipe": "recipes/llama_1b.yaml", "micro_batch_rows": 4},
}
FULL = {
    "seq_len": 4096,
    "vocab_size": 128_256,
    "attn": "flex_attention",
    "deepspeed_config": "ds_configs/zero3_bf16.json",
    "view_len": (20, 400, 80),  # min, max, median
    "train_records": 6000,
    "warmup": 3,
    "steps": 10,
    "case_timeout_s": 200,
    "budget_s": 450,
}
QUICK = {
    "seq_len": 128,
    "vocab_size": 1000,
    "attn": "sdpa",
    "deepspeed_config": "ds_configs/zero3_cpu.json",
    "view_len": (4, 40, 10),
    "train_records": 1000,
    "warmup": 1,
    "steps": 3,
    "case_timeout_s": 120,
    "budget_s": 240,
}
QUICK_PRESET = {"tiny": {"recipe": "recipes/tiny_cpu.yaml", "micro_batch_rows": 2}}
MIN_CASE_S = 20  # a case is not started with less of the budget left


# --------------------------------------------------------------------------------------------
# Synthetic shards


def write_synthetic_shards(out: Path, vocab_size: int, view_len: tuple[int, int, int],
                           train_records: int, val_records: int = 64, seed: int = 0) -> Path:  # fmt: skip
    """A two-view shard folder (train + val split) of random token ids, with a manifest built by
    data_pipeline.preprocess.build_manifest. Special ids as a trained tokenizer has them."""
    import numpy as np

    from data_pipeline import shards as shard_io
    from data_pipeline.preprocess import Settings, build_manifest
    from data_pipeline.sources import ViewSpec
    from data_pipeline.tokenizer import DEFAULT_NUM_PREDICTOR_TOKENS

    n_pred = DEFAULT_NUM_PREDICTOR_TOKENS
    specials = {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "view_sep": 4,
                "predictors": list(range(5, 5 + n_pred))}  # fmt: skip
    first_regular = 5 + n_pred
    lo, hi, median = view_len
    rng = np.random.default_rng(seed)
    dtype = shard_io.dtype_for_vocab(vocab_size)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    meta = {"unit": {"path": "synthetic", "kind": "synthetic", "start": 0,
                     "end": train_records + val_records, "first_line": 1},
            "input_records": train_records + val_records, "skipped": {}, "skip_examples": [],
            "shards": []}  # fmt: skip
    for split, n in (("train", train_records), ("val", val_records)):
        prefix = shard_dir / f"00000.{split}"
        lengths = np.clip(np.rint(rng.lognormal(math.log(median), 0.9, (n, 2))), lo, hi)
        writer = shard_io.ShardWriter(prefix, n_views=2, dtype=dtype)
        for a, b in lengths.astype(int):
            ids = rng.integers(first_regular, vocab_size, a + b)
            writer.add([ids[:a].tolist(), ids[a:].tolist()])
        writer.close()
        meta["shards"].append({
            "name": prefix.name, "split": split, "records": writer.n_records,
            "tokens": writer.n_tokens, "view_tokens": writer.view_tokens,
            "bin_bytes": os.path.getsize(f"{prefix}.bin"), "idx_bytes": os.path.getsize(f"{prefix}.idx"),
            "bin_sha256": shard_io.sha256_file(f"{prefix}.bin"),
            "idx_sha256": shard_io.sha256_file(f"{prefix}.idx"),
        })  # fmt: skip
    settings = Settings(
        views=ViewSpec("fields", ("a", "b")), tokenizer_hash=f"synthetic-random-ids-{vocab_size}",
        vocab_size=vocab_size, dtype=dtype.str, max_record_tokens=2 * hi,
        val_fraction=val_records / (train_records + val_records), shard_bytes=0,
        lm_views=(0, 1), lm_loss_views=(0, 1),
    )  # fmt: skip
    manifest = build_manifest(out, settings, [], [meta], specials)
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    shard_io.write_atomic(out / "manifest.json", text.encode())
    from data_pipeline.verify import verify_folder

    problems = verify_folder(out, full=False)  # no tokenizer to check
    assert not problems, problems
    return out


# --------------------------------------------------------------------------------------------
# Cases (run in a subprocess: `--case SPEC --case_out PATH`)


def overrides_for(spec: dict) -> list[str]:
    objective = "none" if spec["mode"] == "lm" else "jepa"
    out = [
        f"data.paths=[{spec['shards']}]", f"run_dir={spec['run_dir']}",
        f"deepspeed_config={spec['deepspeed_config']}", f"model.size={spec['preset']}",
        f"model.attn_implementation={spec['attn']}", f"data.seq_len_tokens={spec['seq_len']}",
        f"data.micro_batch_rows={spec['micro_batch_rows']}",
        f"data.grad_accum_steps={spec['grad_accum_steps']}",
        f"data.prefetch_steps={spec['prefetch_steps']}", f"jepa.objective={objective}",
        "jepa.predictor_tokens=1", "jepa.loss_dropout=0", "schedule.kind=constant",
        "schedule.warmup_steps=0", f"schedule.train_steps={max(1, spec['warmup'] + spec['steps'])}",
        "checkpoint.resume=false", "checkpoint.save_every_steps=0", "logging.eval_every_steps=0",
        "logging.progress_bar=false", "logging.tensorboard=false",
    ]  # fmt: skip
    if spec.get("activation_checkpointing") is not None:
        out.append(
            f"model.activation_checkpointing={str(spec['activation_checkpointing']).lower()}"
        )
    return out


def _setup(spec: dict):
    from pretrain import trainer
    from pretrain.config import load_config

    cfg = load_config(REPO / spec["recipe"], overrides_for(spec))
    return trainer.setup(cfg)


def _release(run) -> None:
    """The engine and its inputs go; the process group stays (for the next setup)."""
    if run.inputs is not None:
        run.inputs.close()
    run.metrics.close()
    engine, run.engine = run.engine, None
    engine.destroy()
    del engine


def run_train_case(spec: dict) -> dict:
    import torch

    from pretrain import trainer
    from pretrain.distributed import device

    run = _setup(spec)
    cuda = device().type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    trainer.start_inputs(run)
    samples, warm_steps, warm_peak = [], [], None
    n_warm = spec["warmup"]
    for i in range(n_warm + spec["steps"]):
        if i == n_warm and cuda:  # the timed phase's own peak
            warm_peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        step_in = run.inputs.next()
        res = trainer.train_step(run, step_in, run.inputs.wait_s)
        sync()
        step_s = time.perf_counter() - t0
        logged = trainer.log_step(run, res, run.cfg.optim.lr, step_s)
        run.step += 1
        w = res.work
        if i < n_warm:
            warm_steps.append(step_s)
            continue
        samples.append({
            "step_s": step_s, "tokens": w.tokens, "lm_tokens": w.lm_tokens,
            "label_tokens": w.label_tokens, "with_jepa": res.with_jepa, "applied": res.applied,
            "tokens_per_s": logged["tokens_per_s/total"], "lm_tokens_per_s": logged["tokens_per_s/lm"],
            "mfu": logged.get("mfu"), "loss": logged["loss/total"], "wait_share": logged["data_wait_share"],
        })  # fmt: skip
        print(f"step {i}: {step_s:.4f} s, {w.tokens} tokens, loss {logged['loss/total']:.4f}",
              flush=True)  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    rows = spec["micro_batch_rows"] * spec["grad_accum_steps"]
    trainer.teardown(run, clean=True)

    def med(key: str) -> float | None:
        values = [s[key] for s in samples if s[key] is not None]
        return statistics.median(values) if values else None

    return {
        "step_s": med("step_s"), "step_s_min": min(s["step_s"] for s in samples),
        "step_s_max": max(s["step_s"] for s in samples),
        "tokens_per_s": med("tokens_per_s"), "lm_tokens_per_s": med("lm_tokens_per_s"),
        "mfu": med("mfu"), "peak_gpu_gib": peak, "warmup_peak_gpu_gib": warm_peak,
        "warmup_step_s": warm_steps, "data_wait_share": med("wait_share"),
        "tokens_per_step": statistics.mean(s["tokens"] for s in samples),
        "lm_tokens_per_step": statistics.mean(s["lm_tokens"] for s in samples),
        "fill": statistics.mean(s["tokens"] for s in samples) / (rows * spec["seq_len"]),
        "skipped_steps": sum(not s["applied"] for s in samples),
        "rows_with_jepa": all(s["with_jepa"] for s in samples),
        "loss_first": samples[0]["loss"], "loss_last": samples[-1]["loss"],
    }  # fmt: skip


def boundary_grads(spec: dict) -> tuple[dict, dict]:
    """Full gradients at the accumulation boundary of the trainer's first step, and facts."""
    from deepspeed.utils import safe_get_full_grad

    from pretrain import trainer

    run = _setup(spec)
    engine, captured = run.engine, {}
    step = engine.step

    def capturing_step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary() and not captured:
            for name, p in engine.module.named_parameters():
                captured[name] = safe_get_full_grad(p).detach().float().cpu()
        return step(*args, **kwargs)

    engine.step = capturing_step  # train_step calls it after every micro-batch's backward
    trainer.start_inputs(run)
    step_in = run.inputs.next()
    assert step_in.with_jepa
    res = trainer.train_step(run, step_in)
    del engine.step  # the instance attribute: the engine's own step() again
    sums = res.sums.tolist()
    facts = {
        "micro_batches": len(step_in.micro), "pairs": float(step_in.counts[1]),
        "lm_tokens": float(step_in.counts[0]), "loss": sums[3],
        "accum_dtype": str(getattr(engine.optimizer, "gradient_accumulation_dtype", None)),
    }  # fmt: skip
    _release(run)
    assert captured, "engine.step() never ran at an accumulation boundary"
    return captured, facts


def run_parity_case(spec: dict) -> dict:
    import gc

    import torch

    from pretrain.distributed import destroy_distributed

    n = spec["rows"]
    one, facts_one = boundary_grads({**spec, "micro_batch_rows": n, "grad_accum_steps": 1})
    gc.collect()  # the first engine's memory, before the second is built
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    many, facts_many = boundary_grads({**spec, "micro_batch_rows": 1, "grad_accum_steps": n})
    destroy_distributed(barrier=True)
    assert one.keys() == many.keys(), set(one) ^ set(many)
    max_abs, sq_diff, sq_ref = 0.0, 0.0, 0.0
    for name, a in one.items():
        d = a - many[name]
        max_abs = max(max_abs, float(d.abs().max()))
        sq_diff += float(d.double().pow(2).sum())
        sq_ref += float(a.double().pow(2).sum())
    rel = math.sqrt(sq_diff) / max(math.sqrt(sq_ref), 1e-30)
    return {
        "rows": n, "max_abs_diff": max_abs, "rel_l2_diff": rel,
        "pass": sq_ref > 0 and math.isfinite(rel) and rel <= PARITY_MAX_REL_L2,
        "grad_l2": math.sqrt(sq_ref), "n_params": len(one),
        "loss_1xN": facts_one["loss"], "loss_Nx1": facts_many["loss"],
        "micro_batches": [facts_one["micro_batches"], facts_many["micro_batches"]],
        "pairs": facts_one["pairs"], "accum_dtype": facts_many["accum_dtype"],
    }  # fmt: skip


def run_case(spec: dict, out: Path) -> int:
    import warnings

    # DeepSpeed calls torch.distributed functions deprecated in torch 2.13, on every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed")
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    result = run_parity_case(spec) if spec["kind"] == "parity" else run_train_case(spec)
    result["case_wall_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=1))
    return 0


# --------------------------------------------------------------------------------------------
# The driver


def error_line(log: str) -> str:
    """The exception line of a traceback (the last `SomethingError: …`), else the last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln).strip() for ln in log.splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head and " " not in head and (head.endswith(("Error", "Exception")) or "Error" in head):
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def launch(spec: dict, work: Path, name: str, env: dict, timeout_s: float) -> dict:
    """Runs one case in its own process group; its result dict with status (and error)."""
    out, log = work / f"{name}.json", work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(spec),
           "--case_out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the case and its compile workers
            proc.wait()
            rc = None
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if rc == 0 and out.exists():
        return {"status": "ok", "wall_s": wall, **json.loads(out.read_text())}
    tail = text.splitlines()[-40:]
    if rc is None:
        return {"status": "timeout", "error": f"no result after {timeout_s:.0f} s",
                "wall_s": wall, "log_tail": tail}  # fmt: skip
    err = error_line(text)
    status = "oom" if "out of memory" in err.lower() else "failed"
    return {"status": status, "error": f"exit {rc}: {err}", "wall_s": wall, "log_tail": tail}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "deepspeed"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info(dev: str) -> dict:
    import torch

    if dev == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(0),
                "count": torch.cuda.device_count(), "cuda": torch.version.cuda}  # fmt: skip
    return {"type": "cpu", "name": platform.processor() or platform.machine(),
            "count": os.cpu_count()}  # fmt: skip


def child_env(dev: str) -> dict:
    env = dict(os.environ)
    cache = Path(tempfile.gettempdir()) / "llm_jepa_gpu_check_cache"
    for var, sub in (("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TRITON_CACHE_DIR", "triton"),
                     ("TORCHINDUCTOR_CACHE_DIR", "inductor")):  # fmt: skip
        env.setdefault(var, str(cache / sub))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a world of one per case
        env.pop(var, None)
    if dev == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    s = report["settings"]
    print(f"\n{report['device']['name']} ({report['device']['type']}), torch "
          f"{report['versions']['torch']}, transformers {report['versions']['transformers']}, "
          f"deepspeed {report['versions']['deepspeed']}, {report['date']}")  # fmt: skip
    print(f"{s['precision']} ZeRO-3, world size 1, {s['attn']}, rows of {s['seq_len']} tokens, "
          f"vocab {s['vocab_size']}, {s['warmup']} warm-up + {s['steps']} timed steps per case")  # fmt: skip
    head = (f"{'case':<12}{'status':<9}{'rows':>5}{'ckpt':>5}{'step s':>9}{'tok/s':>11}"
            f"{'LM tok/s':>11}{'MFU':>7}{'peak GiB':>9}{'fill':>6}{'warm-up s':>10}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for c in report["cases"]:
        warm = sum(c.get("warmup_step_s") or []) or None
        print(f"{c['preset'] + '/' + c['mode']:<12}{c['status']:<9}{c['micro_batch_rows']:>5}"
              f"{'on' if c['activation_checkpointing'] else 'off':>5}{fmt(c.get('step_s'), '.4f'):>9}"
              f"{fmt(c.get('tokens_per_s'), ',.0f'):>11}{fmt(c.get('lm_tokens_per_s'), ',.0f'):>11}"
              f"{fmt(c.get('mfu'), '.3f'):>7}{fmt(c.get('peak_gpu_gib'), '.2f'):>9}"
              f"{fmt(c.get('fill'), '.2f'):>6}{fmt(warm, '.1f'):>10}")  # fmt: skip
        if c["status"] != "ok":
            print(f"{'':<12}{c.get('error', '')}")
    for preset, r in report["ratios"].items():
        print(f"JEPA/LM, {preset}: time per LM token {fmt(r['time_per_lm_token'], '.3f')} "
              f"(token ratio {fmt(r['tokens_per_lm_token'], '.3f')}), "
              f"step time {fmt(r['step_time'], '.3f')}")  # fmt: skip
    p = report["parity"]
    if p.get("status") == "ok":
        verdict = "pass" if p["pass"] else "FAIL"
        print(f"accumulation parity, {p['preset']} {p['precision']} (grad accumulation "
              f"{p['accum_dtype']}), 1×{p['rows']} vs {p['rows']}×1 rows: max abs diff "
              f"{p['max_abs_diff']:.3e}, rel L2 {p['rel_l2_diff']:.3e} "
              f"(≤ {PARITY_MAX_REL_L2:g}): {verdict}")  # fmt: skip
    else:
        print(f"accumulation parity, {p['preset']}: {p['status']}: {p.get('error', '')}")


def ratios(cases: list[dict]) -> dict:
    out = {}
    by = {(c["preset"], c["mode"]): c for c in cases if c["status"] == "ok"}
    for preset in dict.fromkeys(c["preset"] for c in cases):
        lm, jepa = by.get((preset, "lm")), by.get((preset, "jepa"))
        if lm is None or jepa is None:
            continue
        out[preset] = {
            "time_per_lm_token": lm["lm_tokens_per_s"] / jepa["lm_tokens_per_s"],
            "tokens_per_lm_token": (jepa["tokens_per_step"] / jepa["lm_tokens_per_step"])
            / (lm["tokens_per_step"] / lm["lm_tokens_per_step"]),
            "step_time": jepa["step_s"] / lm["step_s"],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, fp32, sdpa, short rows (CI)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON report (default gpu_check.json)")
    ap.add_argument(
        "--presets", help="comma-separated size presets (default 125m,1b; --quick: tiny)"
    )
    ap.add_argument("--steps", type=int, help="timed steps per case (default 10; --quick: 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3; --quick: 1)")
    ap.add_argument("--activation_checkpointing", choices=("recipe", "on", "off"), default="recipe")
    ap.add_argument(
        "--case_timeout", type=float, help="seconds per case (default 200; --quick: 120)"
    )
    ap.add_argument(
        "--budget", type=float, help="seconds for all cases (default 450; --quick: 240)"
    )
    ap.add_argument("--no_parity", action="store_true", help="skip the accumulation parity check")
    ap.add_argument("--workdir", help="keep shards, run dirs and case logs here (default: temp)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--case_out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        return run_case(json.loads(args.case), Path(args.case_out))

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available here (use --device cpu --quick)",
                  file=sys.stderr)  # fmt: skip
            return 2
    elif not args.quick:
        print(
            "error: the full check needs a GPU; on a CPU run --quick --device cpu", file=sys.stderr
        )
        return 2
    base = QUICK if args.quick else FULL
    table = QUICK_PRESET if args.quick else PRESETS
    presets = args.presets.split(",") if args.presets else list(table)
    unknown = [p for p in presets if p not in table]
    if unknown:
        print(f"error: --presets {unknown} not among {sorted(table)}", file=sys.stderr)
        return 2
    warmup = base["warmup"] if args.warmup is None else args.warmup
    steps = base["steps"] if args.steps is None else args.steps
    case_timeout = args.case_timeout or base["case_timeout_s"]
    budget = args.budget or base["budget_s"]
    precision = "fp32" if args.quick else "bf16"
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = work / "shards"
        if not (shards / "manifest.json").exists():
            write_synthetic_shards(shards, base["vocab_size"], base["view_len"],
                                   base["train_records"])  # fmt: skip
        env = child_env(args.device)
        common = {"device": args.device, "shards": str(shards), "seq_len": base["seq_len"],
                  "attn": base["attn"], "deepspeed_config": base["deepspeed_config"],
                  "grad_accum_steps": 1, "prefetch_steps": 1}  # fmt: skip
        ckpt = {"recipe": None, "on": True, "off": False}[args.activation_checkpointing]

        def recipe_ckpt(preset: str) -> bool:
            from pretrain.config import load_config

            return load_config(REPO / table[preset]["recipe"]).model.activation_checkpointing

        jobs = []
        for preset in presets:
            for mode in MODES:
                jobs.append({**common, **table[preset], "kind": "train", "preset": preset,
                             "mode": mode, "warmup": warmup, "steps": steps,
                             "activation_checkpointing": ckpt})  # fmt: skip
        parity_preset = presets[0]
        if not args.no_parity:
            rows = max(PARITY_MIN_ROWS, table[parity_preset]["micro_batch_rows"])
            jobs.insert(min(2, len(jobs)), {
                **common, **table[parity_preset],
                "kind": "parity", "preset": parity_preset, "mode": "jepa", "rows": rows,
                "warmup": 0, "steps": 1, "activation_checkpointing": ckpt,
                "prefetch_steps": 0,
            })  # fmt: skip

        cases, parity = [], {"status": "skipped", "preset": parity_preset, "error": "--no_parity"}
        for job in jobs:
            name = f"{job['kind']}-{job['preset']}-{job['mode']}"
            job["run_dir"] = str(work / "runs" / name)
            left = budget - (time.perf_counter() - t_start)
            if left < MIN_CASE_S:
                result = {"status": "skipped", "error": f"time budget ({budget:.0f} s) spent"}
            else:
                print(f"[gpu_check] {name} ...", flush=True)
                result = launch(job, work, name, env, min(case_timeout, left))
                print(f"[gpu_check] {name}: {result['status']} in {result['wall_s']:.1f} s"
                      + (f": {result['error']}" if result["status"] != "ok" else ""), flush=True)  # fmt: skip
            ac = job["activation_checkpointing"]
            facts = {"preset": job["preset"], "mode": job["mode"],
                     "micro_batch_rows": job["micro_batch_rows"],
                     "activation_checkpointing": recipe_ckpt(job["preset"]) if ac is None else ac}  # fmt: skip
            if job["kind"] == "parity":
                parity = {**facts, "precision": precision, **result}
                parity.pop("mode")
            else:
                cases.append({**facts, **result})

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(args.device),
        "versions": versions(),
        "settings": {
            "quick": args.quick,
            "precision": precision,
            "attn": base["attn"],
            "seq_len": base["seq_len"],
            "vocab_size": base["vocab_size"],
            "deepspeed_config": base["deepspeed_config"],
            "world_size": 1,
            "grad_accum_steps": 1,
            "warmup": warmup,
            "steps": steps,
            "view_len_min_max_median": list(base["view_len"]),
            "parity_max_rel_l2": PARITY_MAX_REL_L2,
        },  # fmt: skip
        "cases": cases,
        "ratios": ratios(cases),
        "parity": parity,
    }
    parity_ok = args.no_parity or (parity.get("status") == "ok" and parity.get("pass"))
    report["ok"] = bool(all(c["status"] == "ok" for c in cases) and parity_ok)
    report["wall_s"] = time.perf_counter() - t_start
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten {args.out} ({report['wall_s']:.0f} s); all cases ok and parity passed: "
          f"{report['ok']}")  # fmt: skip
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
