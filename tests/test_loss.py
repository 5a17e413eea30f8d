"""Losses against values worked out by hand on tiny tensors, plus the global-count and
cross-rank (2 processes over gloo) semantics."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from data_pipeline.packing import IGNORE_INDEX
from pretrain.loss import (
    DISTANCES,
    gather_pairs,
    jepa_loss,
    jepa_loss_sum,
    lm_loss,
    lm_loss_sum,
    sample_stp_triples,
    stp_loss,
    total_loss,
    view_cosine,
)

# --- LM loss ---------------------------------------------------------------------------------


def test_lm_loss_sum_two_class_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2]; the last position is ignored.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])  # (1, 3, 2)
    labels = torch.tensor([[1, 0, IGNORE_INDEX]])
    ce, n = lm_loss_sum(logits, labels)
    assert n.item() == 2
    assert ce.item() == pytest.approx(math.log(4 / 3) + math.log(2), abs=1e-6)


def test_lm_loss_sum_all_ignored_is_zero_not_nan():
    ce, n = lm_loss_sum(torch.randn(2, 3, 5), torch.full((2, 3), IGNORE_INDEX))
    assert ce.item() == 0.0 and n.item() == 0


def test_lm_loss_micro_batches_over_global_count_equal_full_batch_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g)
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[0, :5] = IGNORE_INDEX  # micro-batches with different token counts
    labels[3, 2:] = IGNORE_INDEX
    full_mean = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    micro = [(logits[:1], labels[:1]), (logits[1:], labels[1:])]
    global_tokens = sum(lm_loss_sum(lg, lb)[1] for lg, lb in micro)
    assert global_tokens.item() == (labels != IGNORE_INDEX).sum().item()
    accumulated = sum(lm_loss(lg, lb, global_tokens) for lg, lb in micro)
    assert accumulated.item() == pytest.approx(full_mean.item(), abs=1e-6)


# --- JEPA pairs and distances -------------------------------------------------------------------


def test_gather_pairs_reads_rows_at_pair_indices():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (B, T, H)
    batch = {
        "pair_batch_index": torch.tensor([0, 1]),
        "pred_index": torch.tensor([4, 2]),
        "target_index": torch.tensor([3, 0]),
        "source_index": torch.tensor([1, 1]),
    }
    pred, target, source = gather_pairs(hidden, batch)
    assert torch.equal(pred, torch.stack([hidden[0, 4], hidden[1, 2]]))
    assert torch.equal(target, torch.stack([hidden[0, 3], hidden[1, 0]]))
    assert torch.equal(source, torch.stack([hidden[0, 1], hidden[1, 1]]))


def test_cosine_by_hand():
    # cosines 1, 1/√2, 0 (scale does not matter).
    pred = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    expected = (0.0 + (1 - 1 / math.sqrt(2)) + 1.0) / 3
    assert jepa_loss(pred, target, "cosine").item() == pytest.approx(expected, abs=1e-6)
    assert view_cosine(pred, target).item() == pytest.approx(1 - expected, abs=1e-6)


def test_l2_by_hand():
    # ‖(3, 4, 0)‖ = 5, ‖(0, 0, −2)‖ = 2.
    pred = torch.tensor([[3.0, 4.0, 0.0], [1.0, 2.0, 3.0]])
    target = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 5.0]])
    assert jepa_loss(pred, target, "l2").item() == pytest.approx(3.5, abs=1e-6)


def test_mse_by_hand():
    # pair means: (9 + 16 + 0) / 3 and (0 + 0 + 4) / 3.
    pred = torch.tensor([[3.0, 4.0, 0.0], [1.0, 2.0, 3.0]])
    target = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 5.0]])
    assert jepa_loss(pred, target, "mse").item() == pytest.approx(29 / 6, abs=1e-6)


def test_infonce_by_hand_without_process_group():
    assert not dist.is_initialized()
    # Orthonormal pairs at temperature 0.5: logits [[2, 0], [0, 2]], CE = log(1 + e^-2) each.
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    value = jepa_loss(pred, target, "infonce", temperature=0.5).item()
    assert value == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # Both preds point at target 0 (T = 1): logits rows [1, 0]; positives 0 and 1.
    pred = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    value = jepa_loss(pred, target, "infonce", temperature=1.0).item()
    assert value == pytest.approx(expected, abs=1e-6)


def test_sum_and_count_give_the_mean_over_pairs():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    for distance in ("cosine", "l2", "mse"):
        s1, c1 = jepa_loss_sum(pred[:2], target[:2], distance)
        s2, c2 = jepa_loss_sum(pred[2:], target[2:], distance)
        assert (c1 + c2).item() == 5
        mean = jepa_loss(pred, target, distance)
        assert ((s1 + s2) / (c1 + c2)).item() == pytest.approx(mean.item(), abs=1e-6)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradients_flow_into_pred_and_target(distance):
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(3, 4, generator=g, requires_grad=True)
    target = torch.randn(3, 4, generator=g, requires_grad=True)
    jepa_loss(pred, target, distance).backward()
    assert pred.grad.abs().sum() > 0 and target.grad.abs().sum() > 0


@pytest.mark.parametrize("distance", DISTANCES)
def test_no_pairs_gives_zero_in_the_graph(distance):
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = jepa_loss(pred, torch.zeros(0, 4), distance)
    loss.backward()
    assert loss.item() == 0.0


def test_unknown_distance_is_an_error():
    with pytest.raises(ValueError, match="jepa distance"):
        jepa_loss(torch.ones(1, 2), torch.ones(1, 2), "dot")


# --- InfoNCE across 2 ranks -----------------------------------------------------------------

_SPLIT = (3, 2)  # unequal pair counts per rank


def _infonce_rank(rank: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(3)
        full_pred = torch.randn(sum(_SPLIT), 6, generator=g, requires_grad=True)
        full_target = torch.randn(sum(_SPLIT), 6, generator=g, requires_grad=True)
        # Reference: one process holding every pair.
        logits = F.normalize(full_pred, dim=-1) @ F.normalize(full_target, dim=-1).T / 0.1
        ref = F.cross_entropy(logits, torch.arange(sum(_SPLIT)), reduction="sum")
        ref.backward()

        lo = sum(_SPLIT[:rank])
        sl = slice(lo, lo + _SPLIT[rank])
        pred = full_pred.detach()[sl].clone().requires_grad_()
        target = full_target.detach()[sl].clone().requires_grad_()
        local, count = jepa_loss_sum(pred, target, "infonce", temperature=0.1)
        local.backward()
        assert count.item() == _SPLIT[rank]
        total = local.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, ref.detach(), atol=1e-5, rtol=0)
        # Gradients of the global objective: targets also get the other rank's loss terms.
        torch.testing.assert_close(pred.grad, full_pred.grad[sl], atol=1e-6, rtol=0)
        torch.testing.assert_close(target.grad, full_target.grad[sl], atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()


def test_infonce_negatives_gathered_across_two_ranks(tmp_path):
    mp.spawn(_infonce_rank, args=(str(tmp_path / "pg"),), nprocs=2, join=True)


# --- STP ----------------------------------------------------------------------------------------


def test_stp_triples_are_sorted_inside_spans_and_deterministic():
    spans = torch.tensor([[0, 0, 7], [1, 3, 5], [1, 10, 14]])  # the 2-token span is skipped
    b1, pos1 = sample_stp_triples(spans, 4, torch.Generator().manual_seed(0))
    b2, pos2 = sample_stp_triples(spans, 4, torch.Generator().manual_seed(0))
    assert torch.equal(b1, b2) and torch.equal(pos1, pos2)
    assert b1.tolist() == [0] * 4 + [1] * 4
    assert (pos1[:, 0] < pos1[:, 1]).all() and (pos1[:, 1] < pos1[:, 2]).all()
    assert ((pos1[:4] >= 0) & (pos1[:4] < 7)).all()
    assert ((pos1[4:] >= 10) & (pos1[4:] < 14)).all()


def test_stp_triples_cover_all_subsets_uniformly():
    # 5 positions: 10 possible triples, each drawn about 1 time in 10.
    _, pos = sample_stp_triples(torch.tensor([[0, 0, 5]]), 5000, torch.Generator().manual_seed(1))
    counts = torch.unique(pos, dim=0, return_counts=True)[1]
    assert len(counts) == 10
    assert (counts > 400).all() and (counts < 600).all()


def test_stp_points_on_a_line_give_zero():
    # h_t = f(t)·v with f increasing: every difference points along +v, cos = 1.
    f = torch.tensor([0.0, 1.0, 3.0, 4.0, 8.0, 9.0])
    hidden = (f[:, None] * torch.tensor([1.0, -2.0, 0.5]))[None]  # (1, 6, 3)
    loss = stp_loss(hidden, torch.tensor([[0, 0, 6]]), 8, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_stp_right_angle_and_reversal_by_hand():
    hidden = torch.zeros(1, 8, 2)
    hidden[0, 0:3] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # right angle: 1 − 0
    hidden[0, 3:6] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # reversal: 1 − (−1)
    spans = torch.tensor([[0, 0, 3], [0, 3, 6], [0, 6, 8]])  # 3-token spans: one triple each
    loss = stp_loss(hidden, spans, 2, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx((1.0 + 2.0) / 2, abs=1e-6)


def test_stp_without_long_enough_documents_is_zero_in_the_graph():
    hidden = torch.randn(1, 4, 3, requires_grad=True)
    loss = stp_loss(hidden, torch.tensor([[0, 0, 2]]), 3, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() == 0.0


def test_total_loss_weights_the_terms():
    assert total_loss(torch.tensor(2.0), torch.tensor(0.5), gamma=1.0, lam=4.0).item() == 4.0


# ---------------------------------------------------------------------------------------------
# Anti-collapse regularizers and collapse metrics


def _gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["sigreg", "vicreg"])
def test_regularizers_small_on_gaussian_large_on_collapse_finite_gradient(kind):
    from pretrain.loss import sigreg, sigreg_directions, vicreg

    directions = sigreg_directions(32, 64, seed=3)

    def reg(z):
        return sigreg(z, directions) if kind == "sigreg" else vicreg(z)

    gaussian = reg(_gaussian(4096, 32))
    collapsed = torch.full((4096, 32), 0.7)  # every embedding the same
    one_direction = _gaussian(4096, 1) * torch.ones(1, 32)  # all on one line
    assert gaussian < 0.02, gaussian
    assert reg(collapsed) > 0.5 and reg(one_direction) > 10 * gaussian
    z = collapsed.clone().requires_grad_()
    reg(z).backward()
    assert torch.isfinite(z.grad).all()
    assert reg(torch.zeros(0, 32)) == 0 and reg(torch.zeros(1, 32)) >= 0  # no samples: no NaN


def test_sigreg_directions_depend_on_the_seed_only():
    from pretrain.loss import sigreg_directions

    a, b = sigreg_directions(16, 8, seed=5), sigreg_directions(16, 8, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, sigreg_directions(16, 8, seed=6))
    torch.testing.assert_close(a.norm(dim=0), torch.ones(8))


def test_sigreg_is_minimised_by_the_standard_gaussian_not_by_a_scaled_one():
    from pretrain.loss import sigreg, sigreg_directions

    directions = sigreg_directions(16, 64, seed=1)
    z = _gaussian(4096, 16, seed=2)
    assert sigreg(z, directions) < sigreg(0.3 * z, directions)
    assert sigreg(z, directions) < sigreg(3.0 * z, directions)


def test_collapse_stats():
    from pretrain.loss import collapse_stats

    spread = _gaussian(64, 32)
    cos_bb, cos_pp, erank = collapse_stats(spread, spread).tolist()
    assert abs(cos_bb) < 0.05 and abs(cos_pp) < 0.05 and erank > 20
    same = torch.ones(64, 32) + 1e-4 * _gaussian(64, 32)
    cos_bb, _, erank = collapse_stats(same, same).tolist()
    assert cos_bb > 0.999 and erank < 2
    assert torch.isnan(collapse_stats(spread[:1], spread[:1])).all()
