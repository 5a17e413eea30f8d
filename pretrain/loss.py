"""Losses as pure functions of tensors: logits, hidden states, labels and packed-row indices in,
scalars out. torch.distributed appears only to gather InfoNCE negatives across ranks, and only
when a process group exists; DeepSpeed never.

Sums come with their counts so the engine can divide by GLOBAL counts (all ranks × accumulation
micro-batches): then neither accumulation nor world size changes the objective.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from data_pipeline.packing import IGNORE_INDEX

Distance = Literal["cosine", "l2", "mse", "infonce"]
DISTANCES: tuple[str, ...] = ("cosine", "l2", "mse", "infonce")


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy, number of loss tokens). logits (B, T, V), labels (B, T)
    already shifted (labels[t] is the target of position t), IGNORE_INDEX where no loss."""
    # The fp32 copy of (B·T, V) logits is the largest activation of the step, but bf16
    # log-softmax over a large vocab loses too much precision.
    ce = F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return ce, (labels != IGNORE_INDEX).sum()


def default_chunk_tokens(vocab_size: int) -> int:
    """Positions per LM-head chunk: about 2^26 fp32 logits (256 MiB) per chunk, 64..8192."""
    return int(min(8192, max(64, 2**26 // max(vocab_size, 1))))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ CE(hidden @ weight.T + bias, labels), computed chunk by chunk. The gradients are
    computed in the forward pass, chunk by chunk, and kept until backward (as Liger-Kernel's
    fused linear cross-entropy does): three matmuls per chunk in all, as in the unfused path, and
    no (N, V) tensor ever exists. Peak extra memory: one (chunk, V) fp32 tensor (the softmax is
    computed in place over the logits), plus the (V, H) fp32 weight gradient being accumulated
    (and, for 16-bit weights, one (V, H) buffer of the chunk's product). Backward scales the
    kept gradients in place and lets go of them: it can run once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, with_grad):
        n = hidden.shape[0]
        dev = hidden.device
        total = torch.zeros((), dtype=torch.float32, device=dev)
        grad_h = torch.empty_like(hidden) if with_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if with_grad else None
        grad_b = None
        if with_grad and bias is not None:
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=dev)
        w_tmp = None
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]  # (C, H)
            y = labels[start : start + chunk]  # (C,)
            rows = torch.arange(h.shape[0], device=dev)
            # Logits in the weights' dtype, then fp32, exactly as the unfused path computes them.
            logits = F.linear(h, weight, bias).float()  # (C, V)
            target = logits[rows, y]  # (C,), a copy
            # log-sum-exp in place (torch.logsumexp would allocate another (C, V) tensor)
            peak = logits.amax(dim=-1, keepdim=True)  # (C, 1)
            sum_exp = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)  # logits now exp(x - max)
            total += (sum_exp.log() + peak).squeeze(1).sub_(target).sum()
            if not with_grad:
                del logits
                continue
            # d CE / d logits = softmax - onehot, in place
            probs = logits.div_(sum_exp)
            probs[rows, y] -= 1.0
            g = probs.to(hidden.dtype)  # (C, V); a no-op in fp32
            torch.mm(g, weight, out=grad_h[start : start + chunk])
            if weight.dtype == torch.float32:
                grad_w.addmm_(g.T, h)  # in place: no (V, H) temporary per chunk
            else:  # 16-bit: the chunk's (V, H) product in the weights' dtype, summed in fp32
                if w_tmp is None:
                    w_tmp = torch.empty_like(weight)
                torch.mm(g.T, h, out=w_tmp)
                grad_w += w_tmp
            if grad_b is not None:
                grad_b += probs.sum(0)
            # Free this chunk's (C, V) logits before the next chunk allocates its own.
            del logits, probs, g
        # Kept on ctx, not saved for backward: backward scales them in place and drops them.
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy_sum: backward can run only once")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        gh = grad_h.mul_(grad_out.to(grad_h.dtype))
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype)  # no copy in fp32
        gb = grad_b.mul_(grad_out).to(ctx.weight_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Σ over positions of the next-token cross-entropy of the LM head (weight (V, H), bias (V,))
    applied to hidden (N, H) against labels (N,): pass only the positions that carry a label.
    Equal to lm_loss_sum(hidden @ weight.T + bias, labels) in value and gradients, with no (N, V)
    tensor in the forward or backward pass; chunk_tokens positions at a time (0 = about 2^26
    logits per chunk)."""
    if labels.numel() == 0:
        return (
            hidden.sum() * 0.0 + weight.sum() * 0.0
        )  # in the graph: every rank's backward matches
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    with_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, with_grad)


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, global_tokens: torch.Tensor | int
) -> torch.Tensor:
    """This micro-batch's share of the mean token loss: its CE sum / loss tokens of the whole step
    (every rank and micro-batch), so the shares sum to the step's mean."""
    ce, _ = lm_loss_sum(logits, labels)
    return ce / global_tokens


def gather_pairs(
    hidden: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pred, target, source), each (P, H): hidden (B, T, H) read at the batch's JEPA pair indices.
    pred = Pred(Enc(source view)), target = Enc(target view), source = Enc(source view)."""
    b = batch["pair_batch_index"]  # (P,)
    return (
        hidden[b, batch["pred_index"]],
        hidden[b, batch["target_index"]],
        hidden[b, batch["source_index"]],
    )


def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of x from every rank in rank order, offset of this rank's rows). Gradients flow back
    to each rank's own rows. Ranks may hold different numbers of rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]  # host sync, once per InfoNCE step
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))  # all_gather needs equal shapes
    # The autograd all_gather returns to each rank the sum over ranks of the gradients of its
    # rows: the gradient of the global objective, not just of this rank's loss.
    parts = dist_fn.all_gather(padded)
    gathered = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    return gathered, sum(sizes[: dist.get_rank()])


def _infonce_per_pair(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """(P,) cross-entropy of cosine logits / temperature; the positive of pred i is target i,
    the negatives every other target of the batch on every rank."""
    p = F.normalize(pred, dim=-1)
    t_all, offset = _gather_with_grad(F.normalize(target, dim=-1))  # (P_all, H)
    logits = p @ t_all.T / temperature  # (P, P_all)
    positives = offset + torch.arange(p.shape[0], device=p.device)
    return F.cross_entropy(logits, positives, reduction="none")


def _per_pair(
    pred: torch.Tensor, target: torch.Tensor, distance: Distance, temperature: float
) -> torch.Tensor:
    """(P,) distance of each pair, in fp32."""
    pred, target = pred.float(), target.float()
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1)
    if distance == "l2":
        return torch.linalg.vector_norm(pred - target, dim=-1)
    if distance == "mse":
        return (pred - target).pow(2).mean(dim=-1)
    if distance == "infonce":
        return _infonce_per_pair(pred, target, temperature)
    raise ValueError(f"jepa distance must be one of {DISTANCES}, got {distance!r}")


def jepa_loss_sum(
    pred: torch.Tensor,
    target: torch.Tensor,
    distance: Distance = "cosine",
    temperature: float = 0.07,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over pairs of d(pred, target), number of pairs). pred, target (P, H). No stop-gradient:
    both receive gradients. infonce is a collective when a process group exists: every rank
    must call it, with or without pairs."""
    losses = _per_pair(pred, target, distance, temperature)  # (P,)
    return losses.sum(), torch.tensor(losses.shape[0], device=losses.device)


def jepa_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    distance: Distance = "cosine",
    temperature: float = 0.07,
) -> torch.Tensor:
    """Mean over pairs of d(pred, target); 0 (still in the graph) when there are no pairs.
    cosine: 1 − cos; l2: ‖p − t‖₂; mse: mean squared error of the pair; infonce: see
    jepa_loss_sum (temperature 0.07 as in the LLM-JEPA reference code)."""
    total, count = jepa_loss_sum(pred, target, distance, temperature)
    return total / count.clamp(min=1)


def view_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Metric: mean cosine similarity of the pairs (NaN without pairs), detached."""
    return F.cosine_similarity(pred.detach().float(), target.detach().float(), dim=-1).mean()


def sample_stp_triples(
    doc_spans: torch.Tensor, triples_per_doc: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index (N,), positions (N, 3) sorted s < r < t): triples_per_doc uniformly random
    3-subsets of the positions of each document span [start, end) holding >= 3 tokens.
    doc_spans (D, 3): batch index, start, end. Sampled on the generator's device (a CPU generator
    with CUDA spans costs a copy and a sync)."""
    spans = doc_spans.to(generator.device)
    spans = spans[spans[:, 2] - spans[:, 1] >= 3].repeat_interleave(triples_per_doc, dim=0)
    lengths = spans[:, 2] - spans[:, 1]  # (N,)
    n_max = int(lengths.max()) if len(spans) else 3
    # The 3 smallest of i.i.d. uniform keys over a span's positions are a uniform 3-subset;
    # positions past the span's end get keys above every real one.
    keys = torch.rand(len(spans), n_max, generator=generator, device=generator.device)
    keys.masked_fill_(torch.arange(n_max, device=keys.device) >= lengths[:, None], 2.0)
    offsets = keys.topk(3, dim=1, largest=False).indices.sort(dim=1).values  # (N, 3)
    return spans[:, 0], spans[:, 1:2] + offsets


def stp_loss(
    hidden: torch.Tensor, doc_spans: torch.Tensor, triples_per_doc: int, generator: torch.Generator
) -> torch.Tensor:
    """Semantic tube prediction: mean over sampled s < r < t inside one document of
    1 − cos(h_t − h_r, h_r − h_s). hidden (B, T, H); 0 (still in the graph) without triples.
    Deterministic given the generator's state."""
    b, pos = sample_stp_triples(doc_spans, triples_per_doc, generator)
    if len(b) == 0:
        return hidden[:0].sum()
    b, pos = b.to(hidden.device), pos.to(hidden.device)
    h = hidden[b[:, None], pos].float()  # (N, 3, H): h_s, h_r, h_t
    return (1.0 - F.cosine_similarity(h[:, 2] - h[:, 1], h[:, 1] - h[:, 0], dim=-1)).mean()


def total_loss(lm: torch.Tensor, jepa: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """γ · next-token loss + λ · JEPA (or STP) loss."""
    return gamma * lm + lam * jepa


# --------------------------------------------------------------------------------------------
# Anti-collapse regularizers of a batch of embeddings z (N, D): 1 − cos has no negatives and no
# stop-gradient, so a constant embedding minimises it; these push the batch apart.


def sigreg(
    z: torch.Tensor, directions: torch.Tensor, t_max: float = 3.0, points: int = 17
) -> torch.Tensor:
    """SIGReg (LeJEPA, Balestriero & LeCun, arXiv 2511.08544): how far z (N, D) is from an
    isotropic standard Gaussian, tested along random 1-D projections. For each direction (the
    columns of directions (D, S), unit norm), the Epps–Pulley statistic of the projected batch:
    ∫ w(t) |φ̂(t) − φ(t)|² dt, φ̂ the empirical characteristic function, φ(t) = exp(−t²/2) the
    standard normal's, w(t) = exp(−t²/2), by the trapezoid rule on `points` nodes of [0, t_max]
    (the integrand is even). Mean over directions. About 0 for standard Gaussian samples (an
    O(1/N) finite-sample floor), large for a collapsed batch; smooth everywhere (cos, sin), so its
    gradient is finite on a constant batch. 0 without samples."""
    if z.shape[0] == 0:
        return z.sum() * 0.0
    proj = z.float() @ directions.to(device=z.device, dtype=torch.float32)  # (N, S)
    t = torch.linspace(0.0, t_max, points, device=z.device)  # (K,)
    x = proj.unsqueeze(-1) * t  # (N, S, K)
    gauss = torch.exp(-0.5 * t * t)  # φ(t), also the weight w(t)
    err = (torch.cos(x).mean(0) - gauss).pow(2) + torch.sin(x).mean(0).pow(2)  # (S, K)
    return 2.0 * torch.trapezoid(err * gauss, t, dim=-1).mean()


def sigreg_directions(
    dim: int, slices: int, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(dim, slices) random unit directions, drawn on `device`: the same on every rank for the
    same seed."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d = torch.randn(dim, slices, generator=gen, device=device)
    return d / d.norm(dim=0, keepdim=True)


def vicreg(
    z: torch.Tensor, std_target: float = 1.0, variance_weight: float = 1.0,
    covariance_weight: float = 1.0, eps: float = 1e-4,
) -> torch.Tensor:  # fmt: skip
    """VICReg's variance and covariance terms (Bardes, Ponce & LeCun 2022) of z (N, D):
    variance_weight · mean_d relu(std_target − std_d) + covariance_weight · Σ_{d≠e} cov_de² / D.
    0 when every dimension has std ≥ std_target and they are uncorrelated; about
    variance_weight · std_target for a collapsed batch. 0 with fewer than 2 samples."""
    n, d = z.shape
    if n < 2:
        return z.sum() * 0.0
    zc = z.float() - z.float().mean(0)
    std = torch.sqrt(zc.pow(2).sum(0) / (n - 1) + eps)
    variance = F.relu(std_target - std).mean()
    cov = zc.T @ zc / (n - 1)
    off_diagonal = cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()
    return variance_weight * variance + covariance_weight * off_diagonal / d


def gather_embeddings(z: torch.Tensor) -> torch.Tensor:
    """z (N, D) of every rank, in rank order; gradients flow back to each rank's own rows."""
    return _gather_with_grad(z)[0]


def collapse_stats(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Detached metrics of one batch of pairs, (3,) float64: the mean cosine between different
    records' Enc(B), the same for Pred(Enc(A)) (both → 1 when the embeddings collapse to one
    direction), and the effective rank of the Enc(B) (→ 1). NaN with fewer than 2 pairs."""
    if pred.shape[0] < 2:
        return torch.full((3,), float("nan"), dtype=torch.float64, device=pred.device)

    def mean_off_diagonal_cosine(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.detach().float(), dim=-1)
        n = x.shape[0]
        sim = x @ x.T
        return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))

    s = torch.linalg.svdvals(target.detach().float())
    p = s / s.sum().clamp(min=1e-12)
    erank = torch.exp(-(p * p.clamp(min=1e-12).log()).sum())
    return torch.stack(
        [mean_off_diagonal_cosine(target), mean_off_diagonal_cosine(pred), erank]
    ).double()
