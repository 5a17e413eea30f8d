"""Run metrics: TensorBoard scalars + a metrics.jsonl on rank 0, throughput/MFU, representation panels.

Tags (TensorBoard):
    loss/lm, loss/jepa | loss/stp, loss/total, jepa/cosine, lr, grad_norm,
    tokens_per_s/rank, tokens_per_s/total, mfu (GPU only), memory/*_gib, data_wait_share,
    skipped_steps, eval/loss_lm, eval/loss_jepa, eval/cosine, repr/cosine, repr/effective_rank
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from pretrain.distributed import get_rank

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
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


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with the weights + 6·L·H·T for attention
    scores (causal halves the 12·L·H·T of full attention), as in the PaLM appendix."""
    return 6.0 * n_params + 6.0 * n_layers * hidden * seq_len


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
