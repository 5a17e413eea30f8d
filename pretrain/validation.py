"""Validation during training: LM / JEPA / STP loss on fixed batches and representation panels.

The same `logging.eval_batches` micro-batches per rank every time (the validation dataset is
rewound to its start), through the same objective module as training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pretrain.batches import as_tensors, to_device
from pretrain.config import TrainConfig
from pretrain.distributed import all_gather_object, all_reduce_sum, device, get_rank
from pretrain.metrics import effective_rank
from pretrain.objective import add_label_index, batch_counts


def stp_seed(cfg: TrainConfig, step: int, micro: int, evaluation: bool = False) -> int:
    """Seed of the STP triples of a micro-batch: differs per rank and step, same on resume."""
    entropy = [cfg.seed, int(evaluation), step, get_rank(), micro]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def shared_seed(cfg: TrainConfig, step: int, micro: int) -> int:
    """Seed of what must be the same on every rank for a micro-batch (the SIGReg directions):
    differs per step, same on resume."""
    return int(np.random.SeedSequence([cfg.seed, 7, step, micro]).generate_state(1)[0])


@torch.no_grad()
def evaluate(engine: Any, val_ds: Any, val_start: dict, cfg: TrainConfig) -> dict[str, float]:
    """Validation LM loss, JEPA (or STP) loss and mean view cosine over logging.eval_batches
    micro-batches per rank, plus representation panels on the first one. Collective."""
    engine.eval()
    val_ds.load_state_dict(val_start)
    dev = device()
    with_jepa = cfg.jepa.objective == "jepa"
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # lm_sum, aux_sum, cos_sum
    counts = np.zeros(2)  # lm tokens, aux count
    panel: dict[str, float] = {}
    for i in range(cfg.logging.eval_batches):
        host = add_label_index(val_ds.next_batch(cfg.data.micro_batch_rows, with_jepa))
        counts += batch_counts(host, cfg.jepa, with_jepa)
        batch = to_device(as_tensors(host, pin=False), dev)
        out = engine(batch, with_jepa=with_jepa, stp_seed=stp_seed(cfg, 0, i, evaluation=True))
        sums += torch.stack([out.lm_sum, out.aux_sum, out.cos_sum]).double()
        if i == 0 and with_jepa:
            panel = representation_panel(engine.module, batch)
    total = all_reduce_sum(torch.cat([sums, torch.from_numpy(counts).to(dev)]))
    engine.train()
    lm_sum, aux_sum, cos_sum, lm_n, aux_n = total.tolist()
    res = {"eval/loss_lm": lm_sum / max(lm_n, 1)}
    if aux_n > 0:
        res["eval/loss_jepa" if with_jepa else "eval/loss_stp"] = aux_sum / aux_n
        if with_jepa:
            res["eval/cosine"] = cos_sum / aux_n
    return {**res, **panel}


def representation_panel(objective: Any, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """On a fixed eval batch: mean cos(Pred(Enc(A)), Enc(B)) and the effective rank of the view
    embeddings Enc(A), Enc(B) of all ranks (gathered; collapse shows as a falling rank)."""
    pred, target, source = objective.view_embeddings(batch)
    views = torch.cat([source, target]).float().cpu()  # (2P, H)
    cos = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1).cpu()  # (P,)
    gathered = all_gather_object((views, cos))
    views = torch.cat([g[0] for g in gathered])
    cos = torch.cat([g[1] for g in gathered])
    if views.shape[0] == 0:
        return {}
    return {"repr/cosine": float(cos.mean()), "repr/effective_rank": effective_rank(views)}
