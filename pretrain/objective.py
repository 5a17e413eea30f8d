"""The training objective as a module: DeepSpeed wraps it, it wraps the transformers causal LM.

    objective = Objective(hf_model, cfg.jepa, cfg.model)
    engine = deepspeed.initialize(model=objective, ...)
    sums = engine(batch, with_jepa=True, stp_seed=s, reg_seed=r, stats=False)  # one micro-batch

Its forward runs the decoder once over a packed batch (data_pipeline/packing.py) and returns the
micro-batch's loss SUMS (LM, JEPA or STP, the cosine metric); the engine divides them by the
step's global counts (`step_counts`). The LM head runs only at the positions that carry a label,
chunk by chunk (`loss.linear_cross_entropy_sum`): no (rows × T × vocab) tensor exists in the
forward or the backward pass. Under ZeRO-3 the head's weight is read inside this forward, so
DeepSpeed's parameter getter gathers it (it registers the weight as an external parameter of the
wrapped module, which also re-gathers it for the backward pass); tied embeddings are the same
parameter. `lm_loss="full"` keeps the reference path (all logits, then cross-entropy).

The losses stay pure functions in pretrain/loss.py; nothing here imports DeepSpeed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from data_pipeline.packing import IGNORE_INDEX
from pretrain import loss as losses
from pretrain import model as model_lib
from pretrain.attention import build_attention
from pretrain.config import JepaConfig, ModelConfig

# Config fields of model types whose logits are more than `lm_head(hidden)`; the chunked head
# does not reproduce them.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Batch entries the objective reads on the host: they never go to the device.
HOST_KEYS = ("doc_spans", "sample_ids")


class LossSums(NamedTuple):
    """Loss sums of one micro-batch, scalars (fp32, in the autograd graph except cos_sum).

    A NamedTuple of tensors: DeepSpeed hooks every tensor of a module's output (it would skip
    the fields of a dataclass). aux_sum is the JEPA or STP sum, zero without that term."""

    lm_sum: torch.Tensor
    aux_sum: torch.Tensor
    cos_sum: torch.Tensor
    reg: torch.Tensor
    """The jepa.regularizer of the micro-batch's view embeddings gathered from every rank (the
    same value on every rank), in the graph; 0 without a regularizer."""
    collapse: torch.Tensor
    """(4,) float64, detached: cos(B, B'), cos(Pred, Pred'), effective rank of Enc(B), and 1, of
    this rank's pairs when stats were asked for and it has 2 or more; else zeros (sum, then
    divide by the last entry)."""


def add_label_index(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds `label_index` (flat positions that carry a label) and `label_targets` to a host
    batch, so that selecting them on the device needs no boolean mask (a host sync on CUDA)."""
    flat = batch["labels"].reshape(-1)
    index = np.flatnonzero(flat != IGNORE_INDEX)
    batch["label_index"] = index.astype(np.int64)
    batch["label_targets"] = flat[index].astype(np.int64)
    return batch


def stp_count(doc_spans: np.ndarray | torch.Tensor, triples_per_doc: int) -> int:
    """STP triples drawn from a batch: triples_per_doc per document span of >= 3 tokens."""
    lengths = doc_spans[:, 2] - doc_spans[:, 1]  # doc_spans (D, 3): batch index, start, end
    return int((lengths >= 3).sum()) * triples_per_doc


def batch_counts(batch: dict[str, np.ndarray], jepa: JepaConfig, with_jepa: bool) -> np.ndarray:
    """(LM loss tokens, JEPA pairs | STP triples) of one host batch, float64 (2,)."""
    lm = int((batch["labels"] != IGNORE_INDEX).sum())
    if jepa.objective == "stp":
        aux = stp_count(batch["doc_spans"], jepa.stp_triples_per_doc)
    elif jepa.objective == "jepa" and with_jepa:
        aux = len(batch["pred_index"])
    else:
        aux = 0
    return np.array([lm, aux], dtype=np.float64)


class Objective(torch.nn.Module):
    """γ·LM + λ·(JEPA | STP) over packed rows, as loss sums; wraps a transformers causal LM."""

    def __init__(self, model: torch.nn.Module, jepa: JepaConfig, model_cfg: ModelConfig):
        super().__init__()
        self.model = model
        self.jepa = jepa
        self.attn_impl = model_cfg.attn_implementation
        self.lm_loss = model_cfg.lm_loss
        self.chunk_tokens = model_cfg.lm_loss_chunk_tokens
        if self.lm_loss == "chunked":
            for name in _LOGIT_POSTPROCESSING:
                if getattr(model.config, name, None) not in (None, 0, 1, 1.0):
                    raise ValueError(
                        f"model.lm_loss=chunked: {model.config.model_type} sets {name} "
                        f"(logits are not just lm_head(hidden)); use model.lm_loss=full"
                    )

    # -- the decoder ---------------------------------------------------------------------------

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last (B, T, H) after the final norm: the LM head's input, the jepa.hidden_layer
        states (B, T, H) that JEPA and STP read) from the decoder without its LM head."""
        layer = self.jepa.hidden_layer
        mask = build_attention(batch, self.attn_impl, model_lib.compute_dtype(self.model))
        out = self.model.base_model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=mask,
            use_cache=False,
            output_hidden_states=[layer] if layer != -1 else None,
            return_dict=True,
        )
        last = out.last_hidden_state
        if layer == -1:
            return last, last
        hidden = out.hidden_states[layer]
        if hidden is None:
            raise ValueError(f"jepa.hidden_layer={layer} is out of range for this model")
        return last, hidden

    def _lm_sum_chunked(self, last: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "label_index" in batch:
            index, targets = batch["label_index"], batch["label_targets"]
        else:  # a boolean mask: a host sync on CUDA (the trainer adds the index on the host)
            flat = batch["labels"].reshape(-1)
            index = torch.nonzero(flat != IGNORE_INDEX).squeeze(1)
            targets = flat[index]
        head = self.model.get_output_embeddings()
        h = last.flatten(0, 1).index_select(0, index)  # (N, H): labelled positions only
        # Reading head.weight here, inside the wrapped module's forward, is what lets ZeRO-3
        # gather it (tied embeddings: the same parameter as the input embedding).
        return losses.linear_cross_entropy_sum(
            h, head.weight, targets, getattr(head, "bias", None), self.chunk_tokens
        )

    # -- the objective -------------------------------------------------------------------------

    def forward(
        self, batch: dict[str, Any], with_jepa: bool, stp_seed: int = 0, reg_seed: int = 0,
        stats: bool = False,
    ) -> LossSums:  # fmt: skip
        """stp_seed: this rank's STP triples; reg_seed: the SIGReg directions (the same on every
        rank); stats: also compute the collapse metrics (log steps)."""
        j = self.jepa
        if self.lm_loss == "full":
            logits, hidden = model_lib.forward_batch(
                self.model, batch, self.attn_impl, hidden_layer=j.hidden_layer
            )  # (B, T, V), (B, T, H)
            lm_sum, _ = losses.lm_loss_sum(logits, batch["labels"])
        else:
            last, hidden = self.hidden_states(batch)
            lm_sum = self._lm_sum_chunked(last, batch)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        aux_sum, cos_sum, reg = zero, zero, zero
        collapse = torch.zeros(4, dtype=torch.float64, device=hidden.device)
        if j.objective == "jepa" and with_jepa:
            # Every rank computes the term, pairs or not: infonce gathers negatives across ranks.
            pred, target, source = losses.gather_pairs(hidden, batch)  # (P, H) each
            aux_sum, _ = losses.jepa_loss_sum(pred, target, j.distance, j.infonce_temperature)
            if pred.shape[0]:
                cos_sum = losses.view_cosine(pred, target) * pred.shape[0]
            if j.regularizer != "none":  # a collective too: every rank, pairs or not
                z = losses.gather_embeddings(torch.cat([source, target]))
                reg = self.regularizer(z, reg_seed)
            if stats and pred.shape[0] >= 2:
                collapse = torch.cat([losses.collapse_stats(pred, target), collapse.new_ones(1)])
        elif j.objective == "stp":
            # Triples are drawn on the host from host spans (no device sync), then indexed.
            gen = torch.Generator().manual_seed(stp_seed)
            spans = torch.as_tensor(batch["doc_spans"])
            n = stp_count(spans, j.stp_triples_per_doc)
            aux_sum = losses.stp_loss(hidden, spans, j.stp_triples_per_doc, gen) * n
        return LossSums(lm_sum.float(), aux_sum.float(), cos_sum.float(), reg.float(), collapse)

    def regularizer(self, z: torch.Tensor, seed: int) -> torch.Tensor:
        """jepa.regularizer of the embeddings z (N, H)."""
        j = self.jepa
        if j.regularizer == "sigreg":
            directions = losses.sigreg_directions(z.shape[1], j.sigreg_slices, seed, z.device)
            return losses.sigreg(z, directions, j.sigreg_t_max, j.sigreg_points)
        return losses.vicreg(z, j.vicreg_std, j.vicreg_variance_weight, j.vicreg_covariance_weight)

    @torch.no_grad()
    def view_embeddings(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Pred(Enc(A)), Enc(B), Enc(A)), each (P, H), read at the batch's pair indices."""
        _, hidden = self.hidden_states(batch)
        return losses.gather_pairs(hidden, batch)
