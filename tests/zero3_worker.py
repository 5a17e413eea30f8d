"""Run by tests/test_objective.py under `torchrun --nproc_per_node 2`: checks of the objective
module under real DeepSpeed ZeRO-3 over gloo, written as JSON by rank 0 to argv[1].

    grads      loss and every parameter's gradient of the engine (chunked LM head, each rank
               its own batch) equal the full-logits reference computed in one process over both
               ranks' batches, for LM-only, LLM-JEPA k = 0, 1, 3, STP, tied GPT-2, and LLM-JEPA
               with each regularizer (the reference computes it once over both ranks' pairs,
               the engine over the embeddings gathered from both ranks).
    accum      the gradient of one micro-batch of N rows equals N micro-batches of 1 row
               (fp32, and bf16 with fp32 accumulation), read after the accumulation boundary.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed")

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from data_pipeline.packing import PackingConfig, SpecialIds, collate_rows, pack_rows  # noqa: E402
from pretrain import loss as losses  # noqa: E402
from pretrain.config import JepaConfig, ModelConfig  # noqa: E402
from pretrain.model import build_model, build_model_config  # noqa: E402
from pretrain.objective import Objective, add_label_index, batch_counts  # noqa: E402

SPECIALS = SpecialIds(bos=1, eos=2, pad=0, view_sep=3, predictors=(4, 5, 6))
VOCAB = 300
SEQ_LEN = 96
ROWS = 2  # per rank


def batches(k: int, jepa: bool, seed: int, rows: int = ROWS) -> list[dict[str, np.ndarray]]:
    """`rows` packed rows for each of 2 ranks, from random two-view records."""
    rng = np.random.default_rng(seed)
    records = [[rng.integers(8, VOCAB, rng.integers(2, 12)) for _ in range(2)] for _ in range(40)]
    cfg = PackingConfig(SEQ_LEN, SPECIALS, predictor_tokens=k, jepa=jepa)
    packed, _ = pack_rows(records, cfg)
    assert len(packed) >= 2 * rows, len(packed)
    return [packed[r * rows : (r + 1) * rows] for r in range(2)]


def tensors(rows) -> dict[str, torch.Tensor]:
    host = add_label_index(collate_rows(rows))
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in host.items()}


def make_model(model_type: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = build_model_config(
        model_type, "tiny", vocab_size=VOCAB, max_position_embeddings=SEQ_LEN,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return build_model(config).to(dtype)


def ds_config(micro: int, accum: int, bf16: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * dist.get_world_size(),
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    return cfg


def step_loss(out, counts: np.ndarray, jepa: JepaConfig) -> torch.Tensor:
    n_lm, n_aux = max(counts[0], 1.0), max(counts[1], 1.0)
    loss = out.lm_sum / n_lm
    if jepa.objective != "none":
        loss = loss + jepa.weight * out.aux_sum / n_aux
    return loss


def full_grads(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient (collective: all ranks, same order)."""
    return {
        name: safe_get_full_grad(p).detach().float().clone()
        for name, p in engine.module.named_parameters()
    }


def check_grads(model_type: str, objective: str, k: int, regularizer: str = "none") -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    jepa = JepaConfig(objective=objective, predictor_tokens=k, weight=1.0, regularizer=regularizer,
                      regularizer_weight=3.0, sigreg_slices=16)  # fmt: skip
    per_rank = batches(k, objective == "jepa", seed=10 * k + len(objective))
    counts = sum(batch_counts(collate_rows(rows), jepa, True) for rows in per_rank)  # global

    model = make_model(model_type)
    # eval mode: no dropout (GPT-2 has some), so both sides compute the same function
    reference = Objective(copy.deepcopy(model), jepa, ModelConfig(lm_loss="full")).eval()
    # Reference: one process, both ranks' batches, full logits.
    ref_loss = 0.0
    if regularizer != "none":  # one batch of both ranks' rows: R over all the pairs at once
        gather, losses.gather_embeddings = losses.gather_embeddings, lambda z: z  # no duplicates
        out = reference(tensors(per_rank[0] + per_rank[1]), with_jepa=True, reg_seed=5)
        losses.gather_embeddings = gather
        loss = step_loss(out, counts, jepa) + jepa.regularizer_weight * out.reg
        loss.backward()
        ref_loss += float(loss.detach())
    for r, rows in enumerate(per_rank if regularizer == "none" else []):
        out = reference(tensors(rows), with_jepa=True, stp_seed=1000 + r)
        loss = step_loss(out, counts, jepa)
        loss.backward()
        ref_loss += float(loss.detach())
    ref = {n: p.grad.detach().clone() for n, p in reference.named_parameters()}

    objective_module = Objective(
        model, jepa, ModelConfig(lm_loss="chunked", lm_loss_chunk_tokens=7)
    )
    engine, *_ = deepspeed.initialize(
        model=objective_module, model_parameters=objective_module.parameters(),
        config=ds_config(ROWS, 1),
    )  # fmt: skip
    engine.eval()
    out = engine(tensors(per_rank[rank]), with_jepa=True, stp_seed=1000 + rank, reg_seed=5)
    loss = step_loss(out, counts, jepa) + jepa.regularizer_weight * out.reg / world
    engine.backward(loss * world, scale_wrt_gas=False)
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = full_grads(engine)
    engine.destroy()
    assert set(grads) == set(ref), set(grads) ^ set(ref)
    diffs = {n: float((grads[n] - ref[n]).abs().max()) for n in ref}
    worst = max(diffs, key=diffs.get)
    return {
        "loss": float(total), "ref_loss": ref_loss, "max_grad_diff": diffs[worst],
        "worst_param": worst, "n_params": len(ref),
        "grad_scale": max(float(g.abs().max()) for g in ref.values()),
    }  # fmt: skip


def accumulated_grads(micro: int, accum: int, rows, bf16: bool) -> dict:
    jepa = JepaConfig(objective="jepa", predictor_tokens=1)
    counts = sum(batch_counts(collate_rows(r), jepa, True) for r in rows)  # global: both ranks
    model = Objective(make_model("llama"), jepa, ModelConfig())
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(micro, accum, bf16)
    )
    engine.eval()
    mine = rows[dist.get_rank()]
    for i in range(accum):
        out = engine(tensors(mine[i * micro : (i + 1) * micro]), with_jepa=True)
        loss = step_loss(out, counts, jepa)
        assert engine.is_gradient_accumulation_boundary() == (i == accum - 1)
        engine.backward(loss * dist.get_world_size(), scale_wrt_gas=False)
        if i < accum - 1:
            engine.step()  # advances the micro-step; the update waits for the boundary
    accum_dtype = str(getattr(engine.optimizer, "gradient_accumulation_dtype", None))
    grads = full_grads(engine)
    engine.destroy()
    return {"grads": grads, "accum_dtype": accum_dtype}


def check_accumulation(bf16: bool) -> dict:
    n = 4
    rows = batches(1, True, seed=7, rows=n)
    one = accumulated_grads(n, 1, rows, bf16)
    many = accumulated_grads(1, n, rows, bf16)
    a = torch.cat([g.flatten() for g in one["grads"].values()])
    b = torch.cat([g.flatten() for g in many["grads"].values()])
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "rel_l2_diff": float((a - b).norm() / a.norm()),
        "grad_max": float(a.abs().max()),
        "accum_dtype": many["accum_dtype"],
    }


def main(out_path: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    results = {"grads": {}, "accum": {}}
    cases = [("llama", "none", 1), ("llama", "jepa", 0), ("llama", "jepa", 1),
             ("llama", "jepa", 3), ("llama", "stp", 1), ("gpt2", "jepa", 1)]  # fmt: skip
    for model_type, objective, k in cases:
        results["grads"][f"{model_type}/{objective}/k{k}"] = check_grads(model_type, objective, k)
    for regularizer in ("sigreg", "vicreg"):
        results["grads"][f"llama/jepa/k1/{regularizer}"] = check_grads(
            "llama", "jepa", 1, regularizer
        )
    for name, bf16 in (("fp32", False), ("bf16", True)):
        results["accum"][name] = check_accumulation(bf16)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
