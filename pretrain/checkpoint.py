"""Checkpoints: DeepSpeed states + data position + RNG states + resolved config, resumable.

    RUN_DIR/checkpoints/
        latest                     text file naming the newest complete checkpoint (atomic rename)
        step_000100/               DeepSpeed's files (ZeRO-3 partitions, one set per rank) plus
            trainer_state.json     step, counters, merged data-loader state, manifest hash,
                                   resolved config, DeepSpeed dict, git revision
            rng/rank_<r>.pt        python / numpy / torch (/ cuda) RNG states of rank r

`latest` is written only after every rank finished writing, so a crash mid-save leaves the previous
checkpoint in charge. The newest `keep_last` checkpoints known to be good are kept, and every
newer one until its step shows whether it is good (pretrain/health.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.config import REPO_ROOT
from pretrain.distributed import all_gather_object, barrier, get_rank, get_world_size, print0
from pretrain.engine import save_json

TAG_RE = re.compile(r"^step_(\d+)$")


class DataChangedError(RuntimeError):
    pass


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:06d}"


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values only, so that they load with
    torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (version, torch.tensor(mt, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickled object other than tensors, plain values and the few
    DeepSpeed types allowed: loading it could run code, so it is refused."""


def _deepspeed_types() -> list[type]:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (found by
    torch.serialization.get_unsafe_globals_in_checkpoint on fp32 and bf16 ZeRO-3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


_safe_loading_active = False


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Inside the block every torch.load, ours and DeepSpeed's (whose checkpoint engine and
    zero_to_fp32 ask for weights_only=False), runs with weights_only=True: tensors, plain
    values and DeepSpeed's own few types only. A run_dir received from someone else cannot run
    code on resume or export; a file that tries is refused in one line naming it."""
    global _safe_loading_active
    if _safe_loading_active:  # nested: torch's safe_globals would clear the outer allow-list
        yield
        return
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
            what = f"a pickled {found.group(1)}" if found else "a pickled object"
            raise UnsafeCheckpointError(
                f"{f}: holds {what}, not only tensors and plain values: refused, since loading "
                "it could run code (only load checkpoints from sources you trust)"
            ) from None

    with torch.serialization.safe_globals(_deepspeed_types()):
        torch.load, _safe_loading_active = load, True
        try:
            yield
        finally:
            torch.load, _safe_loading_active = original, False


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names; if that one is incomplete or gone (deleted, a copy cut
    short), the newest complete one, saying so."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if (path / "trainer_state.json").exists():
        return path
    complete = [(s, p) for s, p in checkpoints(root) if (p / "trainer_state.json").exists()]
    if not complete:
        raise FileNotFoundError(
            f"{pointer} names {path.name}, which is incomplete or missing, and {root} holds no "
            "complete checkpoint: remove the folder to start over"
        )
    fallback = complete[-1][1]
    print0(
        f"WARNING: {pointer} names {path.name}, which is incomplete or missing; using {fallback.name}"
    )
    return fallback


def save_checkpoint(
    engine: Any,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    data_state: dict,
    keep_last: int,
    last_good: str | None = None,
) -> Path:
    """Collective: every rank calls it. `data_state` is this rank's dataset.state_dict(). Then
    prune(…, last_good): this new checkpoint is not known to be good yet."""
    from data_pipeline.dataset import PackedDataset

    root = checkpoint_root(run_dir)
    tag = tag_of(step)
    path = root / tag
    merged = PackedDataset.merge_states(all_gather_object(data_state))
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        (path / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), path / "rng" / f"rank_{get_rank()}.pt")
        if get_rank() == 0:
            state = {
                **trainer_state,
                "step": step,
                "data_state": merged,
                "world_size": get_world_size(),
            }
            state.setdefault("git_revision", git_revision())
            save_json(path / "trainer_state.json", state)
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(path, ignore_errors=True)  # partial: it would only take more space
        raise CheckpointWriteError(
            f"no space left on device: writing checkpoint {path} failed ({first_line(e)}); "
            f"removed the partial checkpoint; `latest` still names {_latest_name(root)}"
        ) from None
    barrier()
    if get_rank() == 0:
        write_latest(root, tag)
        prune(run_dir, keep_last, last_good)
    barrier()
    print0(f"saved checkpoint {path}")
    return path


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk): one line, naming the path."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, or how torch.save's C++ writer reports them ("unexpected pos … vs …",
    "basic_ios::clear": it checks positions, not errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(
        s in text for s in ("No space left", "Disk quota", "unexpected pos", "basic_ios::clear")
    )


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _latest_name(root: Path) -> str:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.exists() else "no checkpoint"


def write_latest(root: Path, tag: str) -> None:
    """Points `latest` at `tag`, atomically (a crash leaves the old or the new pointer)."""
    tmp = root / "latest.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(root / "latest")


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))
    )


def prune(run_dir: Path, keep_last: int, last_good: str | None) -> None:
    """Rank 0: deletes the checkpoints known to be good (up to `last_good`) but the newest
    `keep_last`. Newer ones are kept until their step is judged: a checkpoint saved just before
    a blow-up must not cost an older good one its place."""
    if last_good is None:
        return
    limit = int(TAG_RE.match(last_good).group(1))
    good = [p for step, p in checkpoints(checkpoint_root(run_dir)) if step <= limit]
    for p in good[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def reject_from(run_dir: Path, first_bad_step: int) -> Path | None:
    """Rank 0, after a streak of bad steps that began at `first_bad_step`: moves the checkpoints
    saved from that step on (they hold the bad weights) to checkpoints/rejected/, points `latest`
    at the newest one left and returns it (None if none is left)."""
    root = checkpoint_root(run_dir)
    for step, p in checkpoints(root):
        if step >= first_bad_step:
            (root / "rejected").mkdir(exist_ok=True)
            target = root / "rejected" / p.name
            shutil.rmtree(target, ignore_errors=True)
            p.rename(target)
    left = [p for _, p in checkpoints(root) if (p / "trainer_state.json").exists()]
    if not left:
        (root / "latest").unlink(missing_ok=True)
        return None
    write_latest(root, left[-1].name)
    return left[-1]


UNIVERSAL = "universal"


def to_universal(path: Path) -> Path:
    """Converts checkpoint `path` (ZeRO-3 partitions of N ranks) into DeepSpeed's universal
    format in path/universal: per parameter, its full fp32 value and Adam moments, which any
    number of ranks can load. Once per checkpoint, in this process (its loads weights_only)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = path / UNIVERSAL
    if (out / "zero" / "optimizer_state.pt").exists():
        return out
    tmp = path / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=False)  # fmt: skip
    with safe_loading():
        ds_to_universal(args)
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; unused
    tmp.rename(out)
    return out


def load_resharded(engine: Any, path: Path, saved_world: int) -> str | None:
    """Collective: loads a checkpoint written by `saved_world` ranks into this world of another
    size, through the universal format (rank 0 converts, once; then every rank loads its new
    partition of the weights and Adam moments)."""
    if get_rank() == 0:
        done = (path / UNIVERSAL / "zero" / "optimizer_state.pt").exists()
        how = "loading its universal form" if done else "converting it to the universal format"
        print0(f"{path} was written by {saved_world} ranks, this run has {get_world_size()}: "
               f"{how} in {path / UNIVERSAL}")  # fmt: skip
        to_universal(path)
    barrier()
    engine._config.load_universal_checkpoint = True  # read at load time only
    try:
        load_path, _ = engine.load_checkpoint(
            str(path), tag=UNIVERSAL, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    finally:
        engine._config.load_universal_checkpoint = False
    return load_path


def load_checkpoint(
    engine: Any, path: Path, manifest_hash: str, allow_data_change: bool
) -> dict[str, Any]:
    """Loads model/optimizer states and this rank's RNG states; returns trainer_state (holding the
    merged data state). Refuses a changed dataset unless allowed."""
    import json

    state = json.loads((path / "trainer_state.json").read_text())
    if state["manifest_hash"] != manifest_hash:
        msg = (
            f"the dataset changed since checkpoint {path}: manifest hash {state['manifest_hash'][:12]}… "
            f"→ {manifest_hash[:12]}…. Set checkpoint.allow_data_change=true to resume anyway "
            "(the data order restarts at epoch 0)"
        )
        if not allow_data_change:
            raise DataChangedError(msg)
        print0("WARNING: " + msg)
        state["data_state"] = None
    saved_world = state.get("world_size", get_world_size())
    with safe_loading():
        if saved_world == get_world_size():
            load_path, _ = engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )  # fmt: skip
        else:
            load_path = load_resharded(engine, path, saved_world)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        rng_file = path / "rng" / f"rank_{get_rank()}.pt"
        if rng_file.exists() and state.get("world_size") == get_world_size():
            set_rng_state(torch.load(rng_file))
    return state
