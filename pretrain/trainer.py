"""The training loop: set lr → eval / checkpoint → micro-steps → clip + step → log.

Objective per optimizer step (pretrain/loss.py computes the pure parts):

    loss = γ · Σ_tokens CE / N_tokens  +  λ · Σ_pairs d(Pred(Enc(A)), Enc(B)) / N_pairs

where both counts are GLOBAL (all micro-batches of the step, all ranks), computed before the first
backward, so accumulation and world size do not change the objective. DeepSpeed averages gradients
over ranks; each rank's loss is multiplied by the world size to undo that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.packing import IGNORE_INDEX
from pretrain import checkpoint as ckpt
from pretrain import loss as losses
from pretrain import model as model_lib
from pretrain import preemption
from pretrain.config import TrainConfig, build_deepspeed_config, config_to_dict, resolve_path
from pretrain.distributed import (
    all_gather_object,
    all_reduce_sum,
    destroy_distributed,
    device,
    get_rank,
    get_world_size,
    init_distributed,
    print0,
)
from pretrain.engine import SpecialIdsInfo, build_engine, save_json
from pretrain.metrics import (
    MetricsWriter,
    effective_rank,
    flops_per_token,
    memory_gib,
    peak_flops_per_s,
)

# --------------------------------------------------------------------------------------------
# Schedule


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    s, peak = cfg.schedule, cfg.optim.lr
    floor = peak * s.min_lr_ratio
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return peak
    if s.kind == "cosine":
        span = max(1, s.train_steps - s.warmup_steps)
        frac = min(1.0, (step - s.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    decay = s.decay_steps or max(1, round(0.2 * s.train_steps))  # wsd
    decay_start = s.train_steps - decay
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start + 1) / decay)


def jepa_rows_at(cfg: TrainConfig, step: int) -> bool:
    """Whether step `step` builds JEPA segments. Loss dropout draws from an RNG seeded by
    (seed, step): identical on all ranks and across resumes, with no state to save."""
    if cfg.jepa.objective != "jepa":
        return False
    if cfg.jepa.loss_dropout <= 0:
        return True
    return bool(np.random.default_rng([cfg.seed, step, 7]).random() >= cfg.jepa.loss_dropout)


# --------------------------------------------------------------------------------------------
# Forward + losses of one micro-batch


def to_device(batch: dict[str, np.ndarray], dev: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(dev, non_blocking=True)
        for k, v in batch.items()
    }


def micro_losses(
    engine: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig, with_jepa: bool, stp_seed: int
) -> dict[str, torch.Tensor]:
    """Loss sums of one micro-batch (the counts that divide them are global, see step_counts)."""
    j = cfg.jepa
    logits, hidden = model_lib.forward_batch(
        engine, batch, cfg.model.attn_implementation, hidden_layer=j.hidden_layer
    )  # (B, T, V), (B, T, H)
    lm_sum, _ = losses.lm_loss_sum(logits, batch["labels"])
    out = {"lm_sum": lm_sum}
    if j.objective == "jepa" and with_jepa:
        # Every rank calls jepa_loss_sum, pairs or not: infonce gathers negatives across ranks.
        pred, target, _ = losses.gather_pairs(hidden, batch)  # (P, H) each
        out["aux_sum"], _ = losses.jepa_loss_sum(pred, target, j.distance, j.infonce_temperature)
        n = pred.shape[0]
        out["cos_sum"] = (
            losses.view_cosine(pred, target) * n if n else torch.zeros((), device=hidden.device)
        )
    elif j.objective == "stp":
        gen = torch.Generator().manual_seed(stp_seed)
        n = stp_count(batch["doc_spans"], j.stp_triples_per_doc)
        out["aux_sum"] = losses.stp_loss(hidden, batch["doc_spans"], j.stp_triples_per_doc, gen) * n
    return out


def stp_count(doc_spans: np.ndarray | torch.Tensor, triples_per_doc: int) -> int:
    """STP triples drawn from a batch: triples_per_doc per document span of >= 3 tokens."""
    lengths = doc_spans[:, 2] - doc_spans[:, 1]  # doc_spans (D, 3): batch index, start, end
    return int((lengths >= 3).sum()) * triples_per_doc


def step_counts(
    micro: list[dict[str, np.ndarray]], with_jepa: bool, cfg: TrainConfig
) -> tuple[float, float]:
    """Global (LM loss tokens, JEPA pairs | STP triples) of the step: all micro-batches, all ranks."""
    lm = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
    if cfg.jepa.objective == "stp":
        aux = sum(stp_count(b["doc_spans"], cfg.jepa.stp_triples_per_doc) for b in micro)
    else:
        aux = sum(len(b["pred_index"]) for b in micro) if with_jepa else 0
    t = all_reduce_sum(torch.tensor([lm, aux], dtype=torch.float64, device=device()))
    return float(t[0]), float(t[1])


def stp_seed(cfg: TrainConfig, step: int, micro: int, evaluation: bool = False) -> int:
    """Seed of the STP triples of a micro-batch: differs per rank and step, same on resume."""
    entropy = [cfg.seed, int(evaluation), step, get_rank(), micro]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Run state


@dataclass
class Run:
    cfg: TrainConfig
    run_dir: Path
    engine: Any
    train_ds: Any
    val_ds: Any
    val_start: dict
    metrics: MetricsWriter
    ds_config: dict
    manifest_hash: str
    flops_per_token: float
    step: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0


def _dataset(cfg: TrainConfig, split: str, seed: int):
    from data_pipeline.dataset import PackedDataset

    d = cfg.data
    if not d.paths:
        raise ValueError("data.paths is empty: give the shard folders (data.paths=[dir1,dir2])")
    return PackedDataset(
        [resolve_path(p) for p in d.paths],
        seq_len=d.seq_len_tokens,
        predictor_tokens=cfg.jepa.predictor_tokens,
        pairs=d.pairs,
        weights=d.weights,
        split=split,
        seed=seed,
        rank=get_rank(),
        world_size=get_world_size(),
        overlong=d.overlong,
        records_per_row=d.records_per_row,
        shuffle=split == "train",
        loop=True,
        verify_checksums=d.verify_checksums and split == "train",
    )


def setup(cfg: TrainConfig) -> Run:
    init_distributed()
    world = get_world_size()
    ds_config = build_deepspeed_config(cfg, world)
    run_dir = Path(cfg.run_dir)
    train_ds = _dataset(cfg, "train", cfg.seed)
    val_ds = _dataset(cfg, "val", cfg.seed)
    val_start = train_ds.merge_states(all_gather_object(val_ds.state_dict()))
    sp = train_ds.specials
    vocab = SpecialIdsInfo(train_ds.vocab_size, sp.bos, sp.eos, sp.pad)
    engine, hf_config = build_engine(cfg, ds_config, vocab, run_dir)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    fpt = flops_per_token(
        n_params, hf_config.num_hidden_layers, hf_config.hidden_size, cfg.data.seq_len_tokens
    )
    if get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(run_dir / "config.json", config_to_dict(cfg))
        save_json(run_dir / "ds_config.json", ds_config)
        hf_config.save_pretrained(run_dir / "hf_config")
        _copy_tokenizer(train_ds.tokenizer_dir, run_dir / "tokenizer")
    run = Run(
        cfg=cfg, run_dir=run_dir, engine=engine, train_ds=train_ds, val_ds=val_ds,
        val_start=val_start, metrics=MetricsWriter(run_dir, cfg.logging.tensorboard),
        ds_config=ds_config, manifest_hash=train_ds.manifest_hash, flops_per_token=fpt,
    )  # fmt: skip
    print0(f"model: {n_params / 1e6:.2f}M parameters, world size {world}, run dir {run_dir}")
    latest = ckpt.find_latest(run_dir) if cfg.checkpoint.resume else None
    if latest is not None:
        state = ckpt.load_checkpoint(
            engine, latest, run.manifest_hash, cfg.checkpoint.allow_data_change
        )
        if state["data_state"] is not None:
            train_ds.load_state_dict(state["data_state"])
        run.step, run.skipped_steps = state["step"], state["skipped_steps"]
        run.tokens_seen = state["tokens_seen"]
        print0(f"resumed from {latest} at step {run.step}")
    return run


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    if src.exists() and not dst.exists():
        shutil.copytree(src, dst)


def trainer_state(run: Run) -> dict[str, Any]:
    return {
        "skipped_steps": run.skipped_steps,
        "tokens_seen": run.tokens_seen,
        "manifest_hash": run.manifest_hash,
        "config": config_to_dict(run.cfg),
        "ds_config": run.ds_config,
    }


def save(run: Run) -> None:
    ckpt.save_checkpoint(
        run.engine, run.run_dir, run.step, trainer_state(run), run.train_ds.state_dict(),
        run.cfg.checkpoint.keep_last,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Validation LM loss, JEPA loss and mean view cosine over logging.eval_batches micro-batches
    per rank (the same batches every time), plus representation panels on the first one."""
    cfg, engine = run.cfg, run.engine
    engine.eval()
    run.val_ds.load_state_dict(run.val_start)
    dev = device()
    with_jepa = cfg.jepa.objective == "jepa"
    tot = torch.zeros(5, dtype=torch.float64, device=dev)  # lm_sum, lm_n, aux_sum, aux_n, cos_sum
    panel: dict[str, float] = {}
    for i in range(cfg.logging.eval_batches):
        host = run.val_ds.next_batch(cfg.data.micro_batch_rows, with_jepa)
        n_lm, n_aux = step_counts([host], with_jepa, cfg)
        batch = to_device(host, dev)
        out = micro_losses(engine, batch, cfg, with_jepa, stp_seed(cfg, 0, i, evaluation=True))
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        tot += torch.stack([
            out["lm_sum"].double(), zero + n_lm, out.get("aux_sum", zero).double(),
            zero + n_aux, out.get("cos_sum", zero).double(),
        ])  # fmt: skip
        if i == 0 and cfg.jepa.objective == "jepa":
            panel = representation_panel(engine, batch, cfg)
    # Counts are already global (step_counts); only the sums are reduced.
    sums = all_reduce_sum(tot[[0, 2, 4]].clone())
    engine.train()
    lm_sum, jsum, cos = sums.tolist()
    lm_n, jn = tot[1].item(), tot[3].item()
    res = {"eval/loss_lm": lm_sum / max(lm_n, 1)}
    if jn > 0:
        res["eval/loss_jepa" if cfg.jepa.objective == "jepa" else "eval/loss_stp"] = jsum / jn
        if cfg.jepa.objective == "jepa":
            res["eval/cosine"] = cos / jn
    return {**res, **panel}


def representation_panel(
    engine: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig
) -> dict[str, float]:
    """On the fixed eval batch: mean cos(Pred(Enc(A)), Enc(B)) and the effective rank of the view
    embeddings Enc(A), Enc(B) of all ranks (gathered; collapse shows as a falling rank)."""
    _, hidden = model_lib.forward_batch(
        engine, batch, cfg.model.attn_implementation, hidden_layer=cfg.jepa.hidden_layer
    )
    pred, target, source = losses.gather_pairs(hidden, batch)
    views = torch.cat([source, target]).float().cpu()  # (2P, H)
    cos = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1).cpu()  # (P,)
    gathered = all_gather_object((views, cos))
    views = torch.cat([g[0] for g in gathered])
    cos = torch.cat([g[1] for g in gathered])
    if views.shape[0] == 0:
        return {}
    return {"repr/cosine": float(cos.mean()), "repr/effective_rank": effective_rank(views)}


# --------------------------------------------------------------------------------------------
# One optimizer step


def train_step(run: Run, with_jepa: bool) -> dict[str, Any]:
    """Micro-steps + DeepSpeed step (clipping inside). Returns detached tensors and host counts."""
    cfg, engine, dev = run.cfg, run.engine, device()
    j, world = cfg.jepa, get_world_size()
    t0 = time.perf_counter()
    micro = [
        run.train_ds.next_batch(cfg.data.micro_batch_rows, with_jepa)
        for _ in range(cfg.data.grad_accum_steps)
    ]
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in micro)
    n_lm, n_aux = step_counts(micro, with_jepa, cfg)
    data_s = time.perf_counter() - t0
    acc = torch.zeros(4, dtype=torch.float64, device=dev)  # lm_sum, jepa_sum, cos_sum, total
    for k, host_batch in enumerate(micro):
        batch = to_device(host_batch, dev)
        out = micro_losses(engine, batch, cfg, with_jepa, stp_seed(cfg, run.step, k))
        loss = j.lm_weight * out["lm_sum"] / max(n_lm, 1.0)
        aux = out.get("aux_sum")
        if aux is not None and j.weight > 0:
            loss = loss + j.weight * aux / max(n_aux, 1.0)
        # DeepSpeed averages gradients over ranks; the counts are already global.
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()  # applies the update (with clipping) at the accumulation boundary only
        acc += torch.stack([
            out["lm_sum"].detach().double(),
            (aux.detach().double() if aux is not None else torch.zeros((), dtype=torch.float64, device=dev)),
            out.get("cos_sum", torch.zeros((), device=dev)).double(),
            loss.detach().double(),
        ])  # fmt: skip
    return {
        "acc": acc, "n_lm": n_lm, "n_aux": n_aux, "tokens": tokens, "data_s": data_s,
        "applied": engine.was_step_applied(), "with_jepa": with_jepa,
    }  # fmt: skip


def log_step(run: Run, res: dict[str, Any], lr: float, step_s: float) -> dict[str, float]:
    """Reduces the step's sums over ranks (a device sync) and writes the scalars."""
    cfg, world = run.cfg, get_world_size()
    acc = all_reduce_sum(res["acc"].clone())
    lm_sum, aux_sum, cos_sum, total = acc.tolist()
    tokens_total = all_reduce_sum(
        torch.tensor([res["tokens"]], dtype=torch.float64, device=device())
    ).item()
    s = {
        "loss/lm": lm_sum / max(res["n_lm"], 1),
        "loss/total": total,
        "lr": lr,
        "grad_norm": _grad_norm(run.engine),
        "tokens_per_s/rank": res["tokens"] / step_s,
        "tokens_per_s/total": tokens_total / step_s,
        "data_wait_share": res["data_s"] / step_s,
        "skipped_steps": run.skipped_steps,
        "jepa/rows_with_jepa": float(res["with_jepa"]),
        **memory_gib(),
    }
    if res["n_aux"] > 0:
        name = "loss/stp" if cfg.jepa.objective == "stp" else "loss/jepa"
        s[name] = aux_sum / res["n_aux"]
        if cfg.jepa.objective == "jepa":
            s["jepa/cosine"] = cos_sum / res["n_aux"]
    peak = peak_flops_per_s()
    if peak is not None:
        s["mfu"] = run.flops_per_token * tokens_total / step_s / (peak * world)
    run.metrics.log(run.step, s)
    return s


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


# --------------------------------------------------------------------------------------------
# The loop


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def train(cfg: TrainConfig) -> None:
    preemption.install_handler()  # first: a signal during setup is acted on at the first step
    with preemption.held():  # ... but kills no child of the setup (the JIT build's compiler)
        run = setup(cfg)
    try:
        loop(run)
    except BaseException:
        teardown(run, clean=False)  # no barrier: the other ranks may be stuck in a collective
        raise
    teardown(run, clean=True)


def loop(run: Run) -> None:
    cfg, lcfg = run.cfg, run.cfg.logging
    stop = min(cfg.schedule.train_steps, cfg.schedule.stop_at_step or cfg.schedule.train_steps)
    start, consecutive_bad = run.step, 0
    bar = _progress_bar(start, stop) if lcfg.progress_bar else None
    while run.step < stop:
        lr = lr_at(cfg, run.step)
        for group in run.engine.optimizer.param_groups:
            group["lr"] = lr
        if run.step > start and every(run.step, lcfg.eval_every_steps):
            run.metrics.log(run.step, evaluate(run), kind="eval")
        if run.step > start and every(run.step, cfg.checkpoint.save_every_steps):
            save(run)

        t0 = time.perf_counter()
        res = train_step(run, jepa_rows_at(cfg, run.step))
        run.tokens_seen += res["tokens"]
        if res["applied"]:
            consecutive_bad = 0
        else:
            run.skipped_steps += 1
            consecutive_bad += 1
            print0(
                f"step {run.step}: non-finite loss or gradient, update skipped ({consecutive_bad} in a row)"
            )
        logged = None
        if every(run.step + 1, lcfg.log_every_steps) or run.step + 1 == stop or not res["applied"]:
            logged = log_step(run, res, lr, time.perf_counter() - t0)
        run.step += 1
        if bar is not None:
            bar.update(1)
            if logged is not None:
                bar.set_postfix(
                    loss=f"{logged['loss/total']:.4f}", tok_s=f"{logged['tokens_per_s/total']:.0f}"
                )
        if run.step < stop and preemption.stop_requested():  # a collective: every rank, every step
            save(run)
            why = preemption.received_signal()
            print0(
                f"stop requested ({why.name if why else 'signal on another rank'}): checkpoint at step "
                f"{run.step} saved, exiting with {preemption.PREEMPT_EXIT_CODE}"
            )
            raise SystemExit(preemption.PREEMPT_EXIT_CODE)
        if consecutive_bad >= cfg.optim.max_nonfinite_steps:
            save(run)  # skipped steps changed no weights: this is the last good state
            raise NonFiniteError(
                f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (last: step "
                f"{run.step - 1}); stopped. Last good state saved in {run.run_dir / 'checkpoints'}"
            )
    if bar is not None:
        bar.close()
    if lcfg.eval_every_steps > 0:
        run.metrics.log(run.step, evaluate(run), kind="eval")
    if ckpt.find_latest(run.run_dir) is None or ckpt.find_latest(run.run_dir).name != ckpt.tag_of(
        run.step
    ):
        save(run)


class NonFiniteError(RuntimeError):
    pass


def _progress_bar(start: int, stop: int):
    if get_rank() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=stop, initial=start, desc="train", dynamic_ncols=True)


def teardown(run: Run, clean: bool) -> None:
    """Engine deleted and the process group destroyed before exit: without it about 1 run in 8
    aborts at interpreter exit on this machine."""
    run.metrics.close()
    engine = run.engine
    run.engine = None
    engine.destroy()
    del engine
    destroy_distributed(barrier=clean)
