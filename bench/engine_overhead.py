"""Step time of our training engine against a bare PyTorch loop of the same model, and the share
of the engine's step spent getting the batch, side by side in one run.

    python bench/engine_overhead.py [SHARDS_DIR] [--steps 100] [--warmup 5] [--size tiny]
                                    [--seq_len 256] [--micro_batch_rows 8]

Without SHARDS_DIR, a tokenizer and shards of the bundled NL-RX-SYNTH train set are built in a
temporary folder (as tests/conftest.py does). One process, world size 1, fp32 on CPU; the config is
recipes/tiny_cpu.yaml with a constant learning rate. Per iteration, in alternating order:

    engine    the trainer's step on LM-only rows (StepInputs.next + trainer.train_step, as
              trainer.loop runs them): DeepSpeed ZeRO-3 engine over gloo wrapping the objective
              module, AdamW + clipping inside engine.step(), batches packed ahead by the
              background thread (data.prefetch_steps, --prefetch_steps)
    bare      a plain PyTorch loop: the next rows of a twin dataset packed on the main thread,
              the same model and initial weights, forward_batch + lm_loss_sum (full logits),
              backward, clip_grad_norm_, torch.optim.AdamW with the same hyperparameters
    jepa      the trainer's step on JEPA rows (k=1), for its data-wait share only

Steps alternate LM-only / JEPA rows in the engine's stream, so the twin dataset sees other (equally
distributed) rows after the first step; the first engine and bare steps use the same rows and
print their losses, which agree.

Both timed steps include getting the batch. Printed: median step time, median tokens/s
(non-padding tokens), the ratio engine/bare of the median step times, and the median data-wait
share (the time the step waited for its batches / step time, the trainer's `data_wait_share`) for
LM-only and JEPA rows. `log_step` is the median time of trainer.log_step (the metrics of a logged
step), which the trainer does not count in its step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed calls torch.distributed functions deprecated in torch 2.13, on every step.
warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed")

import torch  # noqa: E402

# DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear process-wide with its own autograd
# function ("memory_efficient_linear", for the life of the process): the bare loop runs with the
# original, as it would without DeepSpeed.
TORCH_LINEAR = torch.nn.functional.linear
import deepspeed  # noqa: E402

from data_pipeline.packing import IGNORE_INDEX  # noqa: E402
from pretrain import engine as engine_lib  # noqa: E402
from pretrain import trainer  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.loss import lm_loss_sum  # noqa: E402
from pretrain.model import forward_batch  # noqa: E402

BUNDLED = REPO / "data" / "nlrx_synth" / "train.jsonl"


def build_shards(root: Path) -> Path:
    from data_pipeline.preprocess import preprocess
    from data_pipeline.sources import iter_view_texts
    from data_pipeline.tokenizer import train_tokenizer

    tok, out = root / "tokenizer", root / "shards"
    train_tokenizer(iter_view_texts(str(BUNDLED), "messages"), tok, vocab_size=1000)
    preprocess(str(BUNDLED), "messages", str(tok), str(out), num_workers=1,
               shard_bytes=400_000, val_fraction=0.05, progress=False)  # fmt: skip
    return out


def bare_step(model, opt, ds, cfg) -> dict[str, float]:
    """One optimizer step without the engine, data fetch included, with PyTorch's own linear."""
    ds_linear, torch.nn.functional.linear = torch.nn.functional.linear, TORCH_LINEAR
    try:
        return _bare_step(model, opt, ds, cfg)
    finally:
        torch.nn.functional.linear = ds_linear


def _bare_step(model, opt, ds, cfg) -> dict[str, float]:
    t0 = time.perf_counter()
    host = ds.next_batch(cfg.data.micro_batch_rows, with_jepa=False)
    n_lm = int((host["labels"] != IGNORE_INDEX).sum())
    batch = {k: torch.from_numpy(v) for k, v in host.items()}
    opt.zero_grad(set_to_none=True)
    logits, _ = forward_batch(model, batch, cfg.model.attn_implementation)
    lm_sum, _ = lm_loss_sum(logits, batch["labels"])
    (lm_sum / max(n_lm, 1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
    opt.step()
    step_s = time.perf_counter() - t0
    return {"step_s": step_s, "tok_s": int((host["segment_ids"] > 0).sum()) / step_s,
            "loss": float(lm_sum.detach()) / max(n_lm, 1)}  # fmt: skip


def engine_step(run: trainer.Run) -> dict[str, float]:
    """The trainer's step timed as trainer.loop times it, then log_step timed on its own."""
    t0 = time.perf_counter()
    step_in = run.inputs.next()
    res = trainer.train_step(run, step_in, run.inputs.wait_s)
    step_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    logged = trainer.log_step(run, res, run.cfg.optim.lr, step_s)
    log_s = time.perf_counter() - t1
    run.step += 1
    return {"step_s": step_s, "tok_s": res.work.tokens / step_s,
            "wait": res.wait_s / step_s, "log_s": log_s, "loss": logged["loss/lm"]}  # fmt: skip


def measure(shards: Path, run_dir: Path, args: argparse.Namespace) -> None:
    cfg = load_config(REPO / "recipes" / "tiny_cpu.yaml", [
        f"data.paths=[{shards}]", f"run_dir={run_dir}", f"model.size={args.size}",
        f"data.seq_len_tokens={args.seq_len}", f"data.micro_batch_rows={args.micro_batch_rows}",
        "data.grad_accum_steps=1", "schedule.kind=constant", "schedule.warmup_steps=0",
        f"schedule.train_steps={2 * (args.steps + args.warmup)}", "logging.progress_bar=false",
        "checkpoint.resume=false", f"data.prefetch_steps={args.prefetch_steps}",
    ])  # fmt: skip
    # The bare model first: while the engine lives, transformers builds models under zero.Init.
    twin = trainer._dataset(cfg, "train", cfg.seed)
    sp = twin.specials
    vocab = engine_lib.SpecialIdsInfo(twin.vocab_size, sp.bos, sp.eos, sp.pad)
    model = engine_lib.build_model(cfg, engine_lib.build_hf_config(cfg, vocab), vocab).train()
    o = cfg.optim
    opt = torch.optim.AdamW(engine_lib.param_groups(model, o.weight_decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps)  # fmt: skip
    run = trainer.setup(cfg)
    # Even steps LM-only (timed against bare), odd steps JEPA rows.
    trainer.start_inputs(run, with_jepa_at=lambda step: step % 2 == 1)
    with deepspeed.zero.GatheredParameters(list(run.engine.module.parameters())):
        for p, q in zip(model.parameters(), run.engine.module.parameters(), strict=True):
            p.data.copy_(q.data)  # same initial weights, whatever zero.Init drew

    samples: dict[str, list[dict[str, float]]] = {"engine": [], "bare": [], "jepa": []}
    for it in range(args.warmup + args.steps):
        order = ("engine", "bare") if it % 2 == 0 else ("bare", "engine")
        step = {m: engine_step(run) if m == "engine" else bare_step(model, opt, twin, cfg)
                for m in order}  # fmt: skip
        step["jepa"] = engine_step(run)
        if it == 0:
            print(f"first step, same rows: engine loss {step['engine']['loss']:.6f}, "
                  f"bare loss {step['bare']['loss']:.6f}")  # fmt: skip
        if it >= args.warmup:
            for mode, s in step.items():
                samples[mode].append(s)
    trainer.teardown(run, clean=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[mode])

    print(f"\n{'mode':<8}{'step s':>10}{'tokens/s':>12}{'data wait':>12}{'log_step s':>12}")
    for mode in samples:
        cols = [f"{med(mode, 'step_s'):>10.4f}", f"{med(mode, 'tok_s'):>12.0f}"]
        if mode != "bare":
            cols += [f"{med(mode, 'wait'):>12.4f}", f"{med(mode, 'log_s'):>12.4f}"]
        print(f"{mode:<8}" + "".join(cols))
    ratios = {
        "engine/bare step time": med("engine", "step_s") / med("bare", "step_s"),
        "data wait share, LM-only": med("engine", "wait"),
        "data wait share, JEPA k=1": med("jepa", "wait"),
    }
    for name, value in ratios.items():
        print(f"{name + ':':<28}{value:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("shards", nargs="?", help="shard folder; default: built from the bundled data")
    ap.add_argument("--steps", type=int, default=100, help="measured iterations")
    ap.add_argument("--warmup", type=int, default=5, help="iterations before measuring")
    ap.add_argument("--size", default="tiny", help="model size preset (pretrain/model.py)")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--micro_batch_rows", type=int, default=8)
    ap.add_argument("--prefetch_steps", type=int, default=1, help="0: pack on the main thread")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards) if args.shards else build_shards(Path(tmp))
        measure(shards, Path(tmp) / "run", args)


if __name__ == "__main__":
    main()
