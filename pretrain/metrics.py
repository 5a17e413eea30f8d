"""Run metrics: TensorBoard scalars + a metrics.jsonl on rank 0, throughput/MFU, representation panels.

Tags (TensorBoard):
    loss/lm, loss/jepa | loss/stp, loss/total, jepa/cosine, lr, grad_norm,
    tokens_per_s/rank, tokens_per_s/total, tokens_per_s/lm, tokens_per_s/jepa_extra,
    mfu (GPU only), memory/*_gib, data_wait_share,
    skipped_steps, eval/loss_lm, eval/loss_jepa, eval/cosine, repr/cosine, repr/effective_rank
"""

from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.packing import IGNORE_INDEX
from pretrain.distributed import get_rank

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A40": 150.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 tensor cores
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def peak_flops_per_s() -> float | None:
    """Peak dense bf16 FLOP/s of this rank's GPU, or None (CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():  # ordered: specific names first
        if key in name:
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a decoder-only causal LM."""

    n_matmul_params: int
    """Parameters used in matmuls per token: all parameters except lookup tables (the input
    embedding, learned position embeddings) and the LM head; a tied table is excluded once."""
    n_layers: int
    hidden_size: int
    """Width of the hidden states the LM head reads."""
    attn_dim: int
    """num_attention_heads × head_dim: the query width (grouped-query attention shares K/V
    projections, but the scores and the weighted sum are still computed per query head)."""
    vocab_size: int
    """Rows of the LM head."""

    @classmethod
    def from_hf_config(cls, hf_config) -> ModelShape:
        """Counts parameters exactly by building the model on the meta device (no memory).
        Not while a ZeRO-3 HfDeepSpeedConfig is alive (transformers would build under zero.Init):
        then use from_model on the built model."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        return cls.from_model(model, hf_config)

    @classmethod
    def from_model(cls, model: torch.nn.Module, hf_config) -> ModelShape:
        """The shape of a built transformers causal LM: real, on the meta device, or partitioned
        by ZeRO-3 (whose parameters report their full size as ds_numel / ds_shape)."""
        tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        excluded = {id(p) for m in tables for p in m.parameters()}
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                excluded.update(id(p) for p in module.parameters())
        # parameters() yields each parameter once, so a tied table is excluded once
        n_matmul = sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters() if id(p) not in excluded
        )
        head_dim = getattr(hf_config, "head_dim", None)
        if head_dim is None:
            head_dim = hf_config.hidden_size // hf_config.num_attention_heads
        out = model.get_output_embeddings()
        if out is None:
            vocab = hf_config.vocab_size
        else:
            vocab = getattr(out.weight, "ds_shape", out.weight.shape)[0]
        return cls(
            n_matmul_params=int(n_matmul),
            n_layers=int(hf_config.num_hidden_layers),
            hidden_size=int(hf_config.hidden_size),
            attn_dim=int(hf_config.num_attention_heads * head_dim),
            vocab_size=int(vocab),
        )


@dataclass(frozen=True)
class BatchWork:
    """Work in a packed micro-batch (data_pipeline/packing.py rows); add micro-batches with +."""

    lm_tokens: int = 0
    """Tokens inside LM document spans."""
    jepa_extra_tokens: int = 0
    """Other non-padding tokens: JEPA view and predictor segments."""
    label_tokens: int = 0
    """Positions with a next-token label (labels != IGNORE_INDEX): where the LM head runs."""
    attended_pairs: int = 0
    """(query, key) pairs the packed attention rule allows, over non-padding queries."""

    @property
    def tokens(self) -> int:
        return self.lm_tokens + self.jepa_extra_tokens

    def __add__(self, other: BatchWork) -> BatchWork:
        return BatchWork(
            self.lm_tokens + other.lm_tokens,
            self.jepa_extra_tokens + other.jepa_extra_tokens,
            self.label_tokens + other.label_tokens,
            self.attended_pairs + other.attended_pairs,
        )


def batch_work(batch: dict[str, np.ndarray]) -> BatchWork:
    """BatchWork of a collated batch (fields (B, T); doc_spans (D, 3): batch index, start, end).

    Query q attends key k iff (segment_ids[q] == segment_ids[k] and k <= q) or
    attend_start[q] <= k < attend_end[q]. Segments are contiguous runs (packing numbers them in row
    order), so q sees q - run_start(q) + 1 keys of its own segment (L(L+1)/2 per segment of
    length L), plus its extra range, less the keys of that range already counted in its own
    segment (none in packed rows: predictors see an earlier segment; subtracted for exactness).
    O(B·T), numpy only."""
    seg = np.asarray(batch["segment_ids"])
    start = np.asarray(batch["attend_start"]).astype(np.int64)
    end = np.asarray(batch["attend_end"]).astype(np.int64)
    labels = np.asarray(batch["labels"])
    spans = np.asarray(batch["doc_spans"]).reshape(-1, 3)
    B, T = seg.shape

    real = seg > 0
    n_real = int(real.sum())
    lm = int((spans[:, 2] - spans[:, 1]).sum())

    pos = np.arange(T, dtype=np.int64)
    is_start = np.ones((B, T), dtype=bool)
    is_start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    run_start = np.maximum.accumulate(np.where(is_start, pos, 0), axis=1)
    # each non-padding segment id must form one run, else q - run_start undercounts
    n_runs = int((is_start & real).sum())
    n_segments = len(np.unique((np.arange(B)[:, None] * (int(seg.max()) + 1) + seg)[real]))
    if n_runs != n_segments:
        raise ValueError("segment_ids: a segment is split into several runs")
    own = pos - run_start + 1
    extra = np.maximum(end - start, 0)
    overlap = np.maximum(np.minimum(end, pos + 1) - np.maximum(start, run_start), 0)
    overlap = np.minimum(overlap, extra)
    pairs = int(np.where(real, own + extra - overlap, 0).sum())

    return BatchWork(
        lm_tokens=lm,
        jepa_extra_tokens=n_real - lm,
        label_tokens=int((labels != IGNORE_INDEX).sum()),
        attended_pairs=pairs,
    )


def training_flops(work: BatchWork, shape: ModelShape) -> float:
    """Model FLOPs of one training step (forward + backward) over `work`:

        6 · N · tokens  +  6 · H · V · label_tokens  +  12 · n_layers · d_attn · attended_pairs

    A matmul with a weight matrix costs 2 FLOPs per weight per token forward and 4 backward (the
    gradients of input and weight): 6 per weight per token. N = shape.n_matmul_params over every
    non-padding token; the LM head (H × V) runs only at labelled positions (pretrain.loss chunks
    it over those). Attention per layer and allowed (q, k) pair: q·k costs 2·d_attn and adding
    p·v 2·d_attn forward, twice that backward: 12·d_attn. Pairs are counted under the packed-row
    mask, not the full T² (torchtitan) nor T²/2 (Megatron causal). Padding and the masked-out
    blocks a kernel may still compute are not model FLOPs. Recomputation is not counted."""
    return (
        6.0 * shape.n_matmul_params * work.tokens
        + 6.0 * shape.hidden_size * shape.vocab_size * work.label_tokens
        + 12.0 * shape.n_layers * shape.attn_dim * work.attended_pairs
    )


def mfu(flops: float, seconds: float, peak_flops_per_s: float, world_size: int) -> float:
    """Model FLOPs utilisation: flops done by all ranks in `seconds` over their summed peak."""
    return flops / (seconds * peak_flops_per_s * world_size)


def memory_gib() -> dict[str, float]:
    if torch.cuda.is_available():
        return {
            "memory/allocated_gib": torch.cuda.memory_allocated() / 2**30,
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory/reserved_gib": torch.cuda.memory_reserved() / 2**30,
        }
    # ru_maxrss is in KiB on Linux
    return {"memory/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def effective_rank(x: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of x (N, H).
    1 = all embeddings on one line (collapse); min(N, H) = singular values all equal."""
    s = torch.linalg.svdvals(x.float())
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


class MetricsWriter:
    """Rank 0 writes TensorBoard events and run_dir/metrics.jsonl; other ranks write nothing."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.enabled = get_rank() == 0
        self.tb = None
        self.jsonl = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        # repr() round-trips floats exactly; resume tests compare these values
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **clean}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
