"""Packing is a pure function: exact expected rows for small records."""

import numpy as np
import pytest

from data_pipeline.packing import (
    IGNORE_INDEX as X,
)
from data_pipeline.packing import (
    PackingConfig,
    SpecialIds,
    attention_allowed,
    collate_rows,
    pack_rows,
)

SP = SpecialIds(bos=1, eos=2, pad=3, view_sep=4, predictors=(10, 11, 12))
A = np.array


def cfg(**kw):
    return PackingConfig(**{"seq_len": 24, "specials": SP, "predictor_tokens": 2, **kw})


def test_two_records_k2_exact():
    recs = [[A([20, 21]), A([30, 31, 32])], [A([40]), A([50])]]
    rows, stats = pack_rows(recs, cfg())
    assert len(rows) == 1
    r = rows[0]
    # LM doc 1 | view B 1 | predictors 1 | LM doc 2 | view B 2 | predictors 2 | pad
    assert r["input_ids"].tolist() == [1, 20, 21, 4, 30, 31, 32, 2, 1, 30, 31, 32, 10, 11,
                                       1, 40, 4, 50, 2, 1, 50, 10, 11, 3]  # fmt: skip
    assert r["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 3, 4,
                                          0, 1, 2, 3, 4, 0, 1, 2, 3, 0]  # fmt: skip
    assert r["segment_ids"].tolist() == [1] * 8 + [2] * 4 + [3] * 2 + [4] * 5 + [5] * 2 + [
        6
    ] * 2 + [0]
    assert r["attend_start"].tolist() == [0] * 12 + [0, 0] + [0] * 7 + [14, 14] + [0]
    assert r["attend_end"].tolist() == [0] * 12 + [3, 3] + [0] * 7 + [16, 16] + [0]
    assert r["labels"].tolist() == [20, 21, 4, 30, 31, 32, 2, X, X, X, X, X, X, X,
                                    40, 4, 50, 2, X, X, X, X, X, X]  # fmt: skip
    assert r["pred_index"].tolist() == [13, 22]
    assert r["target_index"].tolist() == [11, 20]
    assert r["source_index"].tolist() == [2, 15]
    assert r["doc_spans"].tolist() == [[0, 8], [14, 19]]
    assert r["sample_ids"].tolist() == [0, 1]
    assert stats.tokens == 23 and stats.rows == 1 and stats.jepa_pairs == 2
    assert stats.non_padding_fraction == pytest.approx(23 / 24)


def test_k0_reads_pred_at_end_of_source():
    rows, _ = pack_rows([[A([20, 21]), A([30])]], cfg(predictor_tokens=0, seq_len=10))
    r = rows[0]
    assert r["input_ids"].tolist() == [1, 20, 21, 4, 30, 2, 1, 30, 3, 3]
    assert r["pred_index"].tolist() == [2] and r["source_index"].tolist() == [2]
    assert r["target_index"].tolist() == [7]
    assert (r["attend_end"] == 0).all()


def test_lm_only_rows_and_single_view():
    rows, stats = pack_rows([[A([20, 21]), A([30])], [A([5, 6, 7])]], cfg(jepa=False, seq_len=12))
    r = rows[0]
    assert r["input_ids"].tolist() == [1, 20, 21, 4, 30, 2, 1, 5, 6, 7, 2, 3]
    assert r["segment_ids"].tolist() == [1] * 6 + [2] * 5 + [0]
    assert r["labels"].tolist() == [20, 21, 4, 30, 2, X, 5, 6, 7, 2, X, X]
    assert len(r["pred_index"]) == 0 and stats.jepa_pairs == 0


def test_lm_loss_views_masks_the_question():
    rows, _ = pack_rows([[A([20, 21]), A([30])]], cfg(jepa=False, seq_len=8, lm_loss_views=(1,)))
    # only v1's token and the eos closing it are targets
    assert rows[0]["labels"].tolist() == [X, X, X, 30, 2, X, X, X]


def test_chain_pairs_three_views():
    recs = [[A([20]), A([30]), A([40])]]
    rows, _ = pack_rows(recs, cfg(pairs="chain", predictor_tokens=1, seq_len=20))
    r = rows[0]
    # doc [1,20,4,30,4,40,2] | [1,30] | [1,40] | P(src 0) | P(src 1)
    assert r["input_ids"][:13].tolist() == [1, 20, 4, 30, 4, 40, 2, 1, 30, 1, 40, 10, 10]
    assert r["position_ids"][:13].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2, 2]
    assert r["attend_start"][11:13].tolist() == [0, 7] and r["attend_end"][11:13].tolist() == [2, 9]
    assert r["pred_index"].tolist() == [11, 12]
    assert r["target_index"].tolist() == [8, 10]
    assert r["source_index"].tolist() == [1, 8]


def test_records_never_straddle_rows():
    recs = [[A([20] * 5), A([30] * 5)] for _ in range(5)]
    rows, stats = pack_rows(recs, cfg(seq_len=30, predictor_tokens=1))
    # each record: 13 (doc) + 6 (view B) + 1 (predictor) = 20 tokens → one record per row
    assert len(rows) == 5 and stats.tokens == 100
    for r in rows:
        assert r["sample_ids"].size == 1 and (r["segment_ids"][20:] == 0).all()


def test_overlong_policies():
    big = [[A(list(range(20, 40))), A([30] * 5)]]  # doc = 28 tokens, with JEPA 28 + 6 + 2
    rows, stats = pack_rows(big, cfg(seq_len=30))
    assert stats.jepa_dropped_overlong == 1 and len(rows[0]["pred_index"]) == 0
    assert rows[0]["input_ids"][:28].tolist() == [1, *range(20, 40), 4, 30, 30, 30, 30, 30, 2]
    rows, stats = pack_rows(big, cfg(seq_len=10))
    assert stats.truncated == 1 and rows[0]["input_ids"].tolist() == [1, *range(20, 29)]
    assert rows[0]["labels"][-1] == X and rows[0]["labels"][0] == 20
    rows, stats = pack_rows(big + [[A([5]), A([6])]], cfg(seq_len=10, overlong="skip"))
    assert stats.skipped_overlong == 1 and rows[0]["sample_ids"].tolist() == [1]


def test_attention_structure():
    rows, _ = pack_rows([[A([20, 21]), A([30, 31, 32])], [A([40]), A([50])]], cfg())
    allowed = attention_allowed(rows[0])
    assert allowed[13].nonzero()[0].tolist() == [0, 1, 2, 12, 13]  # predictor sees [bos] A, itself
    assert allowed[11].nonzero()[0].tolist() == [8, 9, 10, 11]  # view B sees only itself
    assert allowed[7].nonzero()[0].tolist() == list(range(8))  # LM doc is causal
    assert allowed[23].nonzero()[0].tolist() == [23]  # padding attends to itself: no empty row
    assert allowed.any(axis=1).all()


def test_collate():
    rows, _ = pack_rows([[A([20, 21]), A([30])]] * 3, cfg(seq_len=12, predictor_tokens=1))
    b = collate_rows(rows)
    assert b["input_ids"].shape == (3, 12)
    assert b["pair_batch_index"].tolist() == [0, 1, 2]
    assert b["doc_spans"].tolist() == [[0, 0, 6], [1, 0, 6], [2, 0, 6]]


def test_config_validation():
    with pytest.raises(ValueError, match="predictor_tokens"):
        cfg(predictor_tokens=4)
    with pytest.raises(ValueError, match="lm_views must start with view 0"):
        cfg(lm_views=(1, 0))
    with pytest.raises(ValueError, match="subset"):
        cfg(lm_views=(0,), lm_loss_views=(1,))


def test_paper_readout_masks_the_closers_only_on_jepa_records():
    """jepa.readout=paper: Enc(v0) is read at v0's last token, whose target in the shared mode is
    the separator; on a record with JEPA segments no closer (separator, eos) is a target, so no
    position read as an embedding carries LM loss. LM-only records keep their closers."""
    recs = [[A([20, 21]), A([30])]]
    shared, _ = pack_rows(recs, cfg(seq_len=12))
    paper, _ = pack_rows(recs, cfg(seq_len=12, unlabelled_readout=True))
    # LM doc [bos 20 21 sep 30 eos] | view [bos 30] | predictors [10 11] | pad
    assert shared[0]["labels"].tolist()[:6] == [20, 21, 4, 30, 2, X]
    assert paper[0]["labels"].tolist()[:6] == [20, 21, X, 30, X, X]
    assert paper[0]["source_index"].tolist() == [2]  # the position whose target was the sep
    lm_only, _ = pack_rows(recs, cfg(seq_len=12, jepa=False, unlabelled_readout=True))
    assert lm_only[0]["labels"].tolist()[:6] == [20, 21, 4, 30, 2, X]
    single, _ = pack_rows([[A([5, 6])]], cfg(seq_len=8, unlabelled_readout=True))  # no pair
    assert single[0]["labels"].tolist()[:4] == [5, 6, 2, X]
