"""The training loop: set lr → eval / checkpoint → micro-steps → clip + step → log.

Objective per optimizer step (pretrain/objective.py computes the sums, pretrain/loss.py the pure
parts):

    loss = γ · Σ_tokens CE / N_tokens  +  λ · Σ_pairs d(Pred(Enc(A)), Enc(B)) / N_pairs
           + β · mean over micro-batches of R(Enc(A), Enc(B) of all ranks)     (jepa.regularizer)

where both counts are GLOBAL (all micro-batches of the step, all ranks), reduced on the device
before the first backward, so accumulation and world size do not change the objective. DeepSpeed
averages gradients over ranks; each rank's loss is multiplied by the world size to undo that.

Host syncs, all deliberate: `log_step` (.tolist() of the step's sums, at log steps only), the stop
request agreed across ranks every checkpoint.preempt_check_every_steps, evaluation and checkpoints.
DeepSpeed's ZeRO-3 step makes its own (the gradient norm for clipping, the non-finite check behind
`was_step_applied`).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipeline.dataset import DatasetError
from data_pipeline.packing import PackStats
from pretrain import checkpoint as ckpt
from pretrain import preemption
from pretrain.batches import StepInput, StepInputs, to_device
from pretrain.config import (
    ConfigError,
    TrainConfig,
    build_deepspeed_config,
    config_to_dict,
    resolve_path,
)
from pretrain.distributed import (
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    destroy_distributed,
    device,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
    print0,
)
from pretrain.engine import SpecialIdsInfo, build_engine, save_json, setup_warnings
from pretrain.health import LossWatch
from pretrain.metrics import (
    BatchWork,
    MetricsWriter,
    ModelShape,
    memory_gib,
    mfu,
    peak_flops_per_s,
    training_flops,
)
from pretrain.model import check_init_from
from pretrain.rundir import RunDirBusyError, RunDirLock
from pretrain.validation import evaluate, shared_seed, stp_seed

STOP = preemption.PREEMPT_EXIT_CODE
COLLAPSE_LOGS = 5  # log steps in a row above jepa.collapse_warning_cosine before the warning

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
    shape: ModelShape
    watch: LossWatch
    inputs: StepInputs | None = None
    lock: RunDirLock | None = None
    pending: list[tuple[int, bool, torch.Tensor]] = field(default_factory=list)
    """Steps not yet judged: (step, update applied, this rank's share of the mean LM loss)."""
    unconfirmed: list[int] = field(default_factory=list)
    """Steps of checkpoints saved since the last good one was known (good once their step is)."""
    last_good: str | None = None
    """Tag of the newest checkpoint known to hold good weights: never pruned."""
    warned_no_pairs: bool = False
    recent_cos_b_b: deque = field(default_factory=lambda: deque(maxlen=COLLAPSE_LOGS))
    warned_collapse: bool = False
    step: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0


@dataclass
class StepResult:
    """What one optimizer step leaves for logging: device tensors (no sync) and host counts."""

    sums: torch.Tensor
    """(5,) float64 on the device, this rank: LM CE sum, JEPA|STP sum, cosine sum, loss, and the
    regularizer summed over micro-batches (the same on every rank)."""
    collapse: torch.Tensor
    """(4,) float64 on the device, this rank: collapse metrics summed over micro-batches, and
    their count (LossSums.collapse); zeros unless asked for."""
    micro_batches: int
    counts: torch.Tensor
    """(2,) global LM loss tokens and JEPA pairs | STP triples, on the device."""
    work: BatchWork
    """This rank's tokens, labelled positions and attended pairs (host)."""
    with_jepa: bool
    applied: bool
    pack_stats: PackStats
    """This rank's packing statistics so far."""
    wait_s: float
    """Seconds the step waited for its batches (0 when they were packed ahead in time)."""


def check_data_once(cfg: TrainConfig) -> None:
    """The shard folders' start-up checks (both splits), once for all ranks and shared among them:
    each rank checks every W-th shard (data_pipeline.dataset.check_share), the outcomes are
    gathered, and every rank raises the same one-line error: the first folder with a problem, as
    one process checking alone reports it. The ranks then build their datasets without them."""
    from data_pipeline.dataset import check_share, first_check_error
    from data_pipeline.shards import ShardError

    units = [(resolve_path(p), split, cfg.data.verify_checksums and split == "train")
             for p in cfg.data.paths for split in ("train", "val")]  # fmt: skip
    # Without a process group this process checks everything (all_gather_object gives its own).
    rank, world = (get_rank(), get_world_size()) if is_initialized() else (0, 1)
    error = first_check_error(units, all_gather_object(check_share(units, rank, world)))
    if error is not None:
        raise ShardError(error)


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
        blend_by=d.blend_by,
        split=split,
        seed=seed,
        rank=get_rank(),
        world_size=get_world_size(),
        overlong=d.overlong,
        records_per_row=d.records_per_row,
        packing_window=d.packing_window,
        readout=cfg.jepa.readout,
        shuffle=split == "train",
        loop=True,
        verify=False,  # check_data_once did, on rank 0
    )


def check_init_from_once(cfg: TrainConfig, tokenizer_dir: Path, vocab_size: int) -> None:
    """Rank 0 checks that the shards' tokenizer belongs to model.init_from (pretrain/model.py
    `check_init_from`) before any rank loads it; every rank prints the warnings and raises the
    same one-line error."""
    if not cfg.model.init_from:
        return
    outcome = None
    if get_rank() == 0:
        try:
            outcome = (None, check_init_from(cfg.model.init_from, tokenizer_dir, vocab_size,
                                             cfg.model.trust_remote_code))  # fmt: skip
        except (ValueError, OSError) as e:  # transformers reports a bad config.json as OSError
            outcome = (str(e), [])
    error, warnings = broadcast_object(outcome)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    if error is not None:
        raise ConfigError(error)


def own_run_dir(run_dir: Path) -> RunDirLock | None:
    """Rank 0 takes the run folder's lock (pretrain/rundir.py); every rank learns the outcome,
    so a folder owned by a live run stops all of them. Returns rank 0's lock."""
    lock, outcome = None, None
    if get_rank() == 0:
        lock = RunDirLock(run_dir)
        try:
            outcome = ("ok", lock.acquire())
        except RunDirBusyError as e:
            outcome = ("busy", str(e))
    status, message = broadcast_object(outcome)
    if status == "busy":
        raise RunDirBusyError(message)
    if message:
        print0(message)
    return lock


def setup(cfg: TrainConfig) -> Run:
    init_distributed()
    lock = None
    try:
        lock = own_run_dir(Path(cfg.run_dir))
        run = _setup(cfg)
    except BaseException:
        if lock is not None:
            lock.release()
        destroy_distributed(barrier=False)  # else the exit aborts now and then (see teardown)
        raise
    run.lock = lock
    return run


def _setup(cfg: TrainConfig) -> Run:
    world = get_world_size()
    ds_config = build_deepspeed_config(cfg, world)
    for warning in setup_warnings(cfg, ds_config):  # every rank: the launcher log shows one
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    run_dir = Path(cfg.run_dir)
    if not cfg.data.paths:
        raise ValueError("data.paths is empty: give the shard folders (data.paths=[dir1,dir2])")
    check_data_once(cfg)
    train_ds = _dataset(cfg, "train", cfg.seed)
    val_ds = _dataset(cfg, "val", cfg.seed)
    val_start = train_ds.merge_states(all_gather_object(val_ds.state_dict()))
    sp = train_ds.specials
    vocab = SpecialIdsInfo(train_ds.vocab_size, sp.bos, sp.eos, sp.pad)
    check_init_from_once(cfg, train_ds.tokenizer_dir, vocab.vocab_size)
    engine, hf_config = build_engine(cfg, ds_config, vocab, run_dir)
    shape = ModelShape.from_model(engine.module.model, hf_config)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    if get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(run_dir / "config.json", config_to_dict(cfg))
        save_json(run_dir / "ds_config.json", ds_config)
        hf_config.save_pretrained(run_dir / "hf_config")
        _copy_tokenizer(train_ds.tokenizer_dir, run_dir / "tokenizer")
    run = Run(
        cfg=cfg, run_dir=run_dir, engine=engine, train_ds=train_ds, val_ds=val_ds,
        val_start=val_start, metrics=MetricsWriter(run_dir, cfg.logging.tensorboard),
        ds_config=ds_config, manifest_hash=train_ds.manifest_hash, shape=shape,
        watch=LossWatch(cfg.optim.spike_factor, cfg.optim.spike_window, cfg.optim.max_nonfinite_steps),
    )  # fmt: skip
    print0(f"model: {n_params / 1e6:.2f}M parameters, world size {world}, run dir {run_dir}")
    latest = ckpt.find_latest(run_dir) if cfg.checkpoint.resume else None
    if latest is not None:
        state = ckpt.load_checkpoint(
            engine, latest, run.manifest_hash, cfg.checkpoint.allow_data_change
        )
        if state["data_state"] is not None:
            try:
                train_ds.load_state_dict(state["data_state"])
            except DatasetError as e:  # a data state of an older format
                if not cfg.checkpoint.allow_data_change:
                    raise
                print0(f"WARNING: {e}; the data order restarts at epoch 0")
        run.step, run.skipped_steps = state["step"], state["skipped_steps"]
        run.tokens_seen = state["tokens_seen"]
        run.last_good = latest.name
        run.watch.recent.extend(state.get("loss_history", []))
        print0(f"resumed from {latest} at step {run.step}")
    return run


def start_inputs(run: Run, **kwargs: Any) -> StepInputs:
    """Starts packing from the run's step and dataset position (after any resume)."""
    run.inputs = StepInputs(run.train_ds, run.cfg, run.step, pin=device().type == "cuda", **kwargs)
    return run.inputs


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    if src.exists() and not dst.exists():
        shutil.copytree(src, dst)


def trainer_state(run: Run) -> dict[str, Any]:
    return {
        "skipped_steps": run.skipped_steps,
        "tokens_seen": run.tokens_seen,
        "loss_history": list(run.watch.recent),  # spikes are measured against it after a resume
        "manifest_hash": run.manifest_hash,
        "config": config_to_dict(run.cfg),
        "ds_config": run.ds_config,
    }


def save(run: Run) -> None:
    """Checkpoint at run.step; the data position is that of the batches consumed so far."""
    data_state = run.inputs.consumed_state if run.inputs else run.train_ds.state_dict()
    ckpt.save_checkpoint(
        run.engine, run.run_dir, run.step, trainer_state(run), data_state,
        run.cfg.checkpoint.keep_last, last_good=run.last_good,
    )  # fmt: skip
    run.unconfirmed.append(run.step)


def review(run: Run) -> bool:
    """Collective: agrees on a stop request and judges the steps run since the last review (one
    all-reduce of the stop flags and of the steps' LM losses, one host sync). Returns whether a
    stop was requested."""
    dev = device()
    local = [torch.tensor(float(preemption.local_stop()), dtype=torch.float64, device=dev)]
    local += [loss.to(torch.float64) for _, _, loss in run.pending]
    values = all_reduce_sum(torch.stack(local)).tolist()
    for (step, applied, _), loss in zip(run.pending, values[1:]):
        why = run.watch.observe(step, loss, applied)
        if why is not None:
            print0(f"step {step}: {why} ({run.watch.streak} bad in a row)")
        elif step in run.unconfirmed:  # the weights saved before this step are good
            confirm(run, step)
    run.pending.clear()
    return values[0] > 0


def confirm(run: Run, step: int) -> None:
    """The checkpoint saved at `step` holds good weights: it becomes the last good one, and the
    good ones beyond checkpoint.keep_last go (rank 0)."""
    run.last_good = ckpt.tag_of(step)
    run.unconfirmed = [s for s in run.unconfirmed if s > step]
    if get_rank() == 0:
        ckpt.prune(run.run_dir, run.cfg.checkpoint.keep_last, run.last_good)


def stop_bad(run: Run) -> None:
    """After optim.max_nonfinite_steps bad steps in a row: the checkpoints saved since the streak
    began are moved aside, `latest` names the last good one, and the run stops naming it."""
    w = run.watch
    good = ckpt.reject_from(run.run_dir, w.streak_start) if get_rank() == 0 else None
    good = broadcast_object(str(good) if good else None)
    where = (
        f"the last good checkpoint is {good} (written before the streak; the next start resumes "
        f"from it: lower optim.lr or skip the data)"
        if good
        else f"no checkpoint was written before step {w.streak_start}: start over"
    )
    raise NonFiniteError(
        f"{w.streak} bad steps in a row from step {w.streak_start} (non-finite or spiking loss); "
        f"stopped without saving: {where}"
    )


# --------------------------------------------------------------------------------------------
# One optimizer step


def train_step(
    run: Run, step_in: StepInput, wait_s: float = 0.0, stats: bool = False
) -> StepResult:
    """Micro-steps + DeepSpeed step (clipping inside). Makes no host sync of its own. stats:
    compute the collapse metrics too (log steps)."""
    cfg, engine, dev = run.cfg, run.engine, device()
    j, world = cfg.jepa, get_world_size()
    # Global counts, reduced on the device: no host sync (gloo on CPU is synchronous anyway).
    host_counts = torch.from_numpy(step_in.counts)
    if dev.type == "cuda":  # from pinned memory the copy is asynchronous
        host_counts = host_counts.pin_memory()
    counts = all_reduce_sum(host_counts.to(dev, non_blocking=dev.type == "cuda"))
    n_lm, n_aux = counts.float().clamp(min=1.0).unbind()
    sums = torch.zeros(5, dtype=torch.float64, device=dev)
    collapse = torch.zeros(4, dtype=torch.float64, device=dev)
    # R is computed on every rank from the same gathered embeddings: each rank's share is
    # R / world, so that the ranks' shares sum to R (the gather sends gradients back).
    reg_scale = j.regularizer_weight / (world * len(step_in.micro))
    for k, host in enumerate(step_in.micro):
        batch = to_device(host, dev)
        out = engine(batch, with_jepa=step_in.with_jepa, stp_seed=stp_seed(cfg, run.step, k),
                     reg_seed=shared_seed(cfg, run.step, k), stats=stats)  # fmt: skip
        loss = j.lm_weight * out.lm_sum / n_lm
        if j.objective != "none" and j.weight > 0:
            loss = loss + j.weight * out.aux_sum / n_aux
        if j.objective == "jepa" and j.regularizer != "none" and step_in.with_jepa:
            loss = loss + reg_scale * out.reg
        collapse += out.collapse
        # DeepSpeed averages gradients over ranks; the counts are already global.
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()  # applies the update (with clipping) at the accumulation boundary only
        sums += torch.stack([out.lm_sum.detach(), out.aux_sum.detach(), out.cos_sum,
                             loss.detach(), out.reg.detach()])  # fmt: skip
    return StepResult(
        sums=sums, collapse=collapse, micro_batches=len(step_in.micro),
        counts=counts, work=step_in.work, with_jepa=step_in.with_jepa,
        applied=engine.was_step_applied(), pack_stats=step_in.pack_stats, wait_s=wait_s,
    )  # fmt: skip


def log_step(run: Run, res: StepResult, lr: float, step_s: float) -> dict[str, float]:
    """Reduces the step's sums over ranks and writes the scalars: the log step's host sync."""
    cfg, world, w = run.cfg, get_world_size(), res.work
    flops = training_flops(w, run.shape)
    p = res.pack_stats
    local = [w.lm_tokens, w.jepa_extra_tokens, flops, p.records, p.truncated, p.skipped_overlong,
             p.jepa_dropped_overlong, p.tokens, p.rows * p.seq_len]  # fmt: skip
    local = torch.tensor(local, dtype=torch.float64, device=res.sums.device)
    reduced = all_reduce_sum(torch.cat([res.sums, res.collapse, local]))
    lm_sum, aux_sum, cos_sum, total, reg_sum, *rest = reduced.tolist()
    cos_b_b, cos_pred_pred, erank, n_collapse, lm_tok, extra_tok, flops_total, *packing = rest
    records, truncated, skipped, jepa_dropped, tokens, slots = packing
    n_lm, n_aux = res.counts.tolist()
    tokens_rank = w.lm_tokens + w.jepa_extra_tokens
    s = {
        "loss/lm": lm_sum / max(n_lm, 1),
        "loss/total": total,
        "lr": lr,
        "grad_norm": _grad_norm(run.engine),
        "tokens_per_s/rank": tokens_rank / step_s,
        "tokens_per_s/total": (lm_tok + extra_tok) / step_s,
        "tokens_per_s/lm": lm_tok / step_s,
        "tokens_per_s/jepa_extra": extra_tok / step_s,
        "data_wait_share": res.wait_s / step_s,
        "skipped_steps": run.skipped_steps,
        "jepa/rows_with_jepa": float(res.with_jepa),
        # packing so far (all ranks): what the rows lost to data.seq_len_tokens
        "data/truncated_share": truncated / max(records, 1),
        "data/skipped_overlong_share": skipped / max(records, 1),
        "data/jepa_dropped_share": jepa_dropped / max(records, 1),
        "data/non_padding_share": tokens / max(slots, 1),
        **memory_gib(),
    }
    if res.with_jepa and n_aux == 0 and not run.warned_no_pairs:
        run.warned_no_pairs = True
        print0(
            f"WARNING: step {run.step} packed no JEPA pairs on any rank: the JEPA term adds nothing "
            f"({jepa_dropped / max(records, 1):.0%} of records so far had their view segments "
            f"dropped to fit data.seq_len_tokens={cfg.data.seq_len_tokens}; raise it)"
        )
    if n_aux > 0:
        name = "loss/stp" if cfg.jepa.objective == "stp" else "loss/jepa"
        s[name] = aux_sum / n_aux
        if cfg.jepa.objective == "jepa":
            s["jepa/cosine"] = cos_sum / n_aux
    if cfg.jepa.objective == "jepa" and cfg.jepa.regularizer != "none" and res.with_jepa:
        s["jepa/regularizer"] = reg_sum / (world * res.micro_batches)
    if n_collapse > 0:  # mean over ranks and micro-batches with >= 2 pairs
        s["jepa/cos_b_b"] = cos_b_b / n_collapse
        s["jepa/cos_pred_pred"] = cos_pred_pred / n_collapse
        s["jepa/effective_rank_b"] = erank / n_collapse
        warn_if_collapsed(run, s["jepa/cos_b_b"])
    peak = peak_flops_per_s()
    if peak is not None:
        s["mfu"] = mfu(flops_total, step_s, peak, world)
    run.metrics.log(run.step, s)
    return s


def warn_if_collapsed(run: Run, cos_b_b: float) -> None:
    """One warning line when different records' Enc(B) have looked alike for COLLAPSE_LOGS log
    steps in a row (jepa.collapse_warning_cosine)."""
    limit = run.cfg.jepa.collapse_warning_cosine
    run.recent_cos_b_b.append(cos_b_b)
    full = len(run.recent_cos_b_b) == COLLAPSE_LOGS
    if full and min(run.recent_cos_b_b) > limit and not run.warned_collapse:
        run.warned_collapse = True
        print0(
            f"WARNING: step {run.step}: the view embeddings look collapsed: jepa/cos_b_b, the mean "
            f"cosine between different records' Enc(B), has been above {limit:g} for the last "
            f"{COLLAPSE_LOGS} log steps (now {cos_b_b:.4f}); the JEPA term can then be satisfied "
            "without telling records apart (try jepa.regularizer=sigreg or jepa.readout=paper)"
        )


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


# --------------------------------------------------------------------------------------------
# The loop


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def eval_due(run: Run, start: int) -> bool:
    """Every logging.eval_every_steps, but not at the step the run (re)starts from, except at
    step 0 of a run from model.init_from: the checkpoint's own validation losses, the baseline
    that continued pretraining is measured against."""
    n = run.cfg.logging.eval_every_steps
    if run.step == start:
        return n > 0 and run.step == 0 and bool(run.cfg.model.init_from)
    return every(run.step, n)


def train(cfg: TrainConfig) -> None:
    preemption.install_handler()  # first: a signal during setup is acted on after it
    preemption.watch_deepspeed_runner()
    with preemption.held():  # ... but kills no child of the setup (the JIT build's compiler)
        run = setup(cfg)
    try:
        if preemption.stop_requested():  # a collective; no step taken, so nothing new to save
            print0(f"stop requested during the setup: no step taken, exiting with {STOP}")
            raise SystemExit(STOP)
        start_inputs(run)
        loop(run)
    except SystemExit as e:  # an agreed stop is raised by every rank after the same collective:
        teardown(run, clean=e.code == STOP)  # the barrier is safe (else the exit aborts at times)
        raise
    except BaseException:
        teardown(run, clean=False)  # no barrier: the other ranks may be stuck in a collective
        raise
    teardown(run, clean=True)


def loop(run: Run) -> None:
    cfg, lcfg = run.cfg, run.cfg.logging
    stop = min(cfg.schedule.train_steps, cfg.schedule.stop_at_step or cfg.schedule.train_steps)
    start = run.step
    bar = _progress_bar(start, stop) if lcfg.progress_bar else None
    while run.step < stop:
        lr = lr_at(cfg, run.step)
        for group in run.engine.optimizer.param_groups:
            group["lr"] = lr
        if eval_due(run, start):
            run.metrics.log(
                run.step, evaluate(run.engine, run.val_ds, run.val_start, cfg), kind="eval"
            )
        if run.step > start and every(run.step, cfg.checkpoint.save_every_steps):
            review(run)  # a collective: no checkpoint of weights a bad streak produced
            if run.watch.streak == 0:
                save(run)
            else:
                print0(
                    f"step {run.step}: checkpoint not saved, {run.watch.streak} bad steps in a row"
                )

        t0 = time.perf_counter()
        step_in = run.inputs.next()
        log_now = every(run.step + 1, lcfg.log_every_steps) or run.step + 1 == stop
        res = train_step(run, step_in, run.inputs.wait_s, stats=log_now)
        run.tokens_seen += res.work.lm_tokens + res.work.jepa_extra_tokens
        if not res.applied:
            run.skipped_steps += 1
        run.pending.append((run.step, res.applied, res.sums[0] / res.counts[0].clamp(min=1)))
        logged = None
        if log_now or not res.applied:
            logged = log_step(run, res, lr, time.perf_counter() - t0)
        run.step += 1
        if bar is not None:
            bar.update(1)
            if logged is not None:
                bar.set_postfix(
                    loss=f"{logged['loss/total']:.4f}", tok_s=f"{logged['tokens_per_s/total']:.0f}"
                )
        # Every rank sees the same `applied` (DeepSpeed's overflow check is global).
        if every(run.step, cfg.checkpoint.preempt_check_every_steps) or not res.applied:
            stop_requested = review(run)  # a collective
            if run.watch.stop:
                stop_bad(run)
            if run.step < stop and stop_requested:
                stop_on_request(run)
    review(run)
    if run.watch.stop:
        stop_bad(run)
    if bar is not None:
        bar.close()
    if lcfg.eval_every_steps > 0:
        run.metrics.log(run.step, evaluate(run.engine, run.val_ds, run.val_start, cfg), kind="eval")
    latest = ckpt.find_latest(run.run_dir)
    if latest is None or latest.name != ckpt.tag_of(run.step):
        save(run)
    if run.watch.streak == 0 and run.step in run.unconfirmed:  # the run ended on good steps
        confirm(run, run.step)


def stop_on_request(run: Run) -> None:
    """A stop signal: checkpoint (unless a bad streak is under way) and exit with STOP."""
    why = preemption.received_signal()
    why = why.name if why else "signal on another rank"
    if run.watch.streak == 0:
        save(run)
        print0(f"stop requested ({why}): checkpoint at step {run.step} saved, exiting with {STOP}")
    else:
        print0(f"stop requested ({why}): not saved, {run.watch.streak} bad steps in a row; the "
               f"last good checkpoint is {run.last_good}; exiting with {STOP}")  # fmt: skip
    raise SystemExit(STOP)


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
    if run.inputs is not None:
        run.inputs.close()
    run.metrics.close()
    if run.lock is not None:
        run.lock.release()
    engine = run.engine
    run.engine = None
    engine.destroy()
    del engine
    destroy_distributed(barrier=clean)
