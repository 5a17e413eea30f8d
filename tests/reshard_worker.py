"""Resumes a run (pretrain.trainer.setup) and saves what the engine then holds: every
parameter's full fp32 value and Adam moments, the step and the data position. Run under torchrun
or as one python process: `python reshard_worker.py OUT.pt CONFIG [overrides…]`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from pretrain.distributed import all_gather_object, get_rank  # noqa: E402
from pretrain.trainer import setup, teardown  # noqa: E402


def main(out: str, config: str, *overrides: str) -> None:
    run = setup(load_config(config, list(overrides)))
    state = {}
    for name, p in run.engine.module.named_parameters():  # collectives, same order on all ranks
        state[name] = [
            safe_get_full_fp32_param(p).clone(),
            safe_get_full_optimizer_state(p, "exp_avg").clone(),
            safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
        ]
    data = run.train_ds.merge_states(all_gather_object(run.train_ds.state_dict()))
    if get_rank() == 0:
        torch.save({"params": state, "step": run.step, "data": data}, out)
    teardown(run, clean=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
