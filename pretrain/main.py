"""Entry point: `deepspeed pretrain/main.py CONFIG [dotted.key=value ...] [--dry_run]`.

The same command works under `torchrun --nproc_per_node N` and as a single `python` process:

    deepspeed --num_gpus 8 pretrain/main.py recipes/llama_1b.yaml data.paths=[shards/web]
    torchrun --nproc_per_node 2 pretrain/main.py recipes/tiny_cpu.yaml optim.lr=1e-3
    python pretrain/main.py recipes/tiny_cpu.yaml --dry_run
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# `python pretrain/main.py` puts pretrain/ on sys.path, not the repo root.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


def print_dry_run(cfg, world_size: int | None = None) -> None:
    """Prints the resolved config, the DeepSpeed dict and a per-GPU ZeRO-3 memory estimate."""
    from pretrain.config import build_deepspeed_config, config_to_dict
    from pretrain.distributed import get_world_size
    from pretrain.engine import build_hf_config, count_parameters, estimate_memory, setup_warnings

    world = world_size or get_world_size()
    ds_config = build_deepspeed_config(cfg, world)
    vocab = _vocab_from_manifest(cfg)
    n_params, n_emb = count_parameters(build_hf_config(cfg, vocab))
    print("# resolved config")
    print(json.dumps(config_to_dict(cfg), indent=2))
    print(f"# DeepSpeed config (world size {world})")
    print(json.dumps(ds_config, indent=2))
    for warning in setup_warnings(cfg, ds_config):
        print(f"# WARNING: {warning}")
    print(
        f"# model: {n_params:,} parameters ({n_emb:,} in the input embedding), vocab {vocab.vocab_size}"
    )
    print(f"# per-GPU memory estimate, ZeRO-3, world size {world} (model states only, GiB)")
    for k, v in estimate_memory(n_params, ds_config, world).items():
        print(f"{k:>20}: {v:.3f}")


def _vocab_from_manifest(cfg):
    from pretrain.config import resolve_path
    from pretrain.engine import SpecialIdsInfo

    for p in cfg.data.paths:
        manifest = resolve_path(p) / "manifest.json"
        if manifest.exists():
            tok = json.loads(manifest.read_text())["tokenizer"]
            ids = tok["special_ids"]
            return SpecialIdsInfo(int(tok["vocab_size"]), ids["bos"], ids["eos"], ids["pad"])
    print("# (no shard manifest found under data.paths: assuming a 32,000-token vocabulary)")
    return SpecialIdsInfo(32000, 1, 2, 0)


def main(
    config: str,
    *overrides: str,
    dry_run: bool = False,
    world_size: int | None = None,
    local_rank: int | None = None,
) -> None:
    """CONFIG: recipe file (YAML/JSON); overrides: dotted.key=value; --dry_run: print and exit
    (--world_size N: estimate for N ranks instead of the launcher's). local_rank is passed by the
    deepspeed launcher (LOCAL_RANK is read from the environment)."""
    from data_pipeline.dataset import DatasetError
    from data_pipeline.shards import ShardError
    from pretrain.config import ConfigError, build_deepspeed_config, load_config
    from pretrain.rundir import RunDirBusyError

    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    try:
        cfg = load_config(config, [str(o) for o in overrides])
        build_deepspeed_config(cfg, world_size or 1)  # the DeepSpeed JSON exists and parses
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        _user_error(f"config error: {e}")
    if dry_run:
        try:
            print_dry_run(cfg, world_size)
        except (ValueError, OSError) as e:  # model.init_from that does not load, a bad manifest
            _user_error(f"config error: {str(e).splitlines()[0] if str(e) else repr(e)}")
        return
    from pretrain.checkpoint import CheckpointWriteError, DataChangedError, UnsafeCheckpointError
    from pretrain.trainer import NonFiniteError, train

    user_errors = (ConfigError, DatasetError, ShardError, RunDirBusyError, DataChangedError,
                   UnsafeCheckpointError)  # fmt: skip
    try:
        train(cfg)
    except user_errors as e:  # the user's to fix
        _user_error(f"error: {e}")
    except (NonFiniteError, CheckpointWriteError) as e:  # not the user's mistake, their to fix
        _one_line(f"error: {e}", status=1)


def _user_error(line: str) -> None:
    _one_line(line, status=2)


def _one_line(line: str, status: int) -> None:
    """One line on stderr and exit `status`, no traceback; once per launcher, not once per rank.
    Under `python -m pretrain.launch` the line goes to the launcher, which prints each distinct
    line once. Under another launcher (deepspeed, torchrun) the first local rank to claim the
    line prints it: a marker file per (run rendezvous, line) in the node's temp folder."""
    error_dir = os.environ.get("PRETRAIN_ERROR_DIR")
    if error_dir and Path(error_dir).is_dir():
        rank = os.environ.get("RANK", "0")
        with open(Path(error_dir) / f"rank{rank}", "a") as f:
            print(line, file=f)
    elif int(os.environ.get("WORLD_SIZE", "1")) == 1 or _claim(line):
        print(line, file=sys.stderr, flush=True)
    raise SystemExit(status)


def _claim(line: str) -> bool:
    """True for the first process of this run on this node to claim `line`."""
    import hashlib
    import tempfile

    run = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}:{os.getppid()}"
    key = hashlib.sha1(f"{run}\n{line}".encode()).hexdigest()[:20]
    folder = Path(tempfile.gettempdir()) / f"pretrain-errors-{os.getuid()}"
    try:
        folder.mkdir(exist_ok=True)
        os.close(os.open(folder / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:  # no usable temp folder: better twice than never
        return True


if __name__ == "__main__":
    import warnings

    import fire

    # DeepSpeed calls torch.distributed functions deprecated in torch 2.13, on every step.
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated. Please use `torch\.distributed", category=FutureWarning
    )
    fire.Fire(main)
