"""Throughput / MFU accounting for packed rows: exact token, label and attended-pair counts, the
FLOP formula, and the matmul parameter count of real models."""

import numpy as np
import pytest
import torch

from data_pipeline.packing import IGNORE_INDEX as X
from data_pipeline.packing import PackingConfig, SpecialIds, collate_rows, pack_rows
from pretrain.attention import allowed_mask
from pretrain.metrics import BatchWork, ModelShape, batch_work, mfu, training_flops
from pretrain.model import build_model, build_model_config

SP = SpecialIds(bos=1, eos=2, pad=3, view_sep=4, predictors=(10, 11, 12))
A = np.array


def cfg(**kw):
    return PackingConfig(**{"specials": SP, "predictor_tokens": 2, **kw})


def brute_force(batch) -> BatchWork:
    """Counts straight from the definitions: the dense mask, the spans, the labels."""
    seg = torch.as_tensor(batch["segment_ids"])
    allowed = allowed_mask(
        seg, torch.as_tensor(batch["attend_start"]), torch.as_tensor(batch["attend_end"])
    )  # (B, T, T)
    real = seg > 0
    in_doc = np.zeros(seg.shape, dtype=bool)
    for b, s, e in batch["doc_spans"]:
        in_doc[b, s:e] = True
    assert not (in_doc & ~real.numpy()).any()
    return BatchWork(
        lm_tokens=int(in_doc.sum()),
        jepa_extra_tokens=int(real.sum()) - int(in_doc.sum()),
        label_tokens=int((batch["labels"] != X).sum()),
        attended_pairs=int(allowed[real].sum()),  # rows of non-padding queries only
    )


def tiny_batch():
    # One record, views A = [20, 21], B = [30, 31], k = 2 predictors, seq_len 14:
    #   LM document [1, 20, 21, 4, 30, 31, 2]  positions 0-6, segment 1, 7 tokens
    #   view B      [1, 30, 31]                positions 7-9, segment 2, 3 tokens
    #   predictors  [10, 11]                   positions 10-11, segment 3, see [bos] A = [0, 3)
    #   padding                                positions 12-13
    rows, _ = pack_rows([[A([20, 21]), A([30, 31])]], cfg(seq_len=14))
    return collate_rows(rows)


def test_tiny_row_by_hand():
    batch = tiny_batch()
    assert batch["input_ids"][0].tolist() == [1, 20, 21, 4, 30, 31, 2, 1, 30, 31, 10, 11, 3, 3]
    assert batch["attend_start"][0, 10:12].tolist() == [0, 0]
    assert batch["attend_end"][0, 10:12].tolist() == [3, 3]
    work = batch_work(batch)
    # Pairs: LM document causal 7·8/2 = 28; view B causal 3·4/2 = 6; predictors causal 2·3/2 = 3
    # plus 3 keys of [bos] A each: 2·3 = 6. 28 + 6 + 3 + 6 = 43 (the 2 padding queries excluded).
    # Labels: positions 0-5 of the document (targets 20, 21, 4, 30, 31, 2); eos has none.
    assert work == BatchWork(lm_tokens=7, jepa_extra_tokens=5, label_tokens=6, attended_pairs=43)
    assert work == brute_force(batch)
    assert work.tokens == 12


def test_packed_batch_matches_brute_force():
    recs = [
        [A([20, 21, 22]), A([30, 31])],
        [A([40]), A([50, 51, 52])],
        [A([60, 61]), A([70]), A([80, 81])],  # all_from_first: 0→1, 0→2, one predictor segment
        [A([90, 91, 92, 93])],  # single view: LM only
        [A(list(range(20, 60))), A([30])],  # overlong: truncated to seq_len, LM only
    ]
    rows, stats = pack_rows(recs, cfg(seq_len=32, pairs="all_from_first"))
    assert stats.truncated == 1 and len(rows) == 3
    batch = collate_rows(rows)
    work = batch_work(batch)
    expected = brute_force(batch)
    assert work == expected
    # the same batch as a sum of one-row micro-batches
    parts = [batch_work(collate_rows([r])) for r in rows]
    assert sum(parts[1:], parts[0]) == work
    # exact values of this batch (brute force above checks the definitions; these pin them):
    # row 0: rec 0 (doc 8, view 3, pred 2) + rec 1 (doc 7, view 4, pred 2) = 26 tokens
    # row 1: rec 2 (doc 9, views 2 + 3, pred 2) + rec 3 (doc 6) = 22; row 2: 32 truncated
    assert work.lm_tokens == 8 + 7 + 9 + 6 + 32
    assert work.jepa_extra_tokens == (3 + 2) + (4 + 2) + (2 + 3 + 2)
    assert work.label_tokens == 7 + 6 + 8 + 5 + 31  # every doc token but eos; truncated: last cut
    docs = (8 * 9 + 7 * 8 + 9 * 10 + 6 * 7 + 32 * 33) // 2
    views = (3 * 4 + 4 * 5 + 2 * 3 + 3 * 4) // 2
    # each predictor segment: 2·3/2 causal + 2 × |[bos] A| extra keys
    preds = (3 + 2 * 4) + (3 + 2 * 2) + (3 + 2 * 3)
    assert work.attended_pairs == docs + views + preds


def test_extra_range_overlapping_own_segment_counted_once():
    # Hand-made row (not produced by packing): segment 1 = positions 0-3, segment 2 = 4-6, pad 7.
    # Query 5 may also see [2, 6): keys 2, 3 are new, 4, 5 are its own causal keys already.
    seg = A([[1, 1, 1, 1, 2, 2, 2, 0]])
    start = np.zeros_like(seg)
    end = np.zeros_like(seg)
    start[0, 5], end[0, 5] = 2, 6
    start[0, 7], end[0, 7] = 0, 8  # a padding query's range is not counted
    batch = {
        "segment_ids": seg,
        "attend_start": start,
        "attend_end": end,
        "labels": A([[5, 6, 7, X, X, X, X, X]]),
        "doc_spans": A([[0, 0, 4]]),
    }
    work = batch_work(batch)
    # 4·5/2 + 3·4/2 + 2 = 18
    assert work == BatchWork(lm_tokens=4, jepa_extra_tokens=3, label_tokens=3, attended_pairs=18)
    assert work == brute_force(batch)


def test_split_segment_is_rejected():
    batch = {
        "segment_ids": A([[1, 2, 1, 0]]),
        "attend_start": np.zeros((1, 4), dtype=np.int32),
        "attend_end": np.zeros((1, 4), dtype=np.int32),
        "labels": np.full((1, 4), X),
        "doc_spans": A([[0, 0, 1]]),
    }
    with pytest.raises(ValueError, match="runs"):
        batch_work(batch)


def test_training_flops_formula():
    work = batch_work(tiny_batch())
    shape = ModelShape(n_matmul_params=1000, n_layers=2, hidden_size=8, attn_dim=16, vocab_size=50)
    # 6·1000·12 + 6·8·50·6 + 12·2·16·43 = 72000 + 14400 + 16512
    assert training_flops(work, shape) == 102912.0
    assert mfu(102912.0, 2.0, 25728.0, 2) == 1.0


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_model_shape_llama_untied_gqa():
    config = build_model_config("llama", "tiny", vocab_size=100, max_position_embeddings=64)
    shape = ModelShape.from_hf_config(config)
    model = build_model(config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    expected = n_params(model) - n_params(model.model.embed_tokens) - n_params(model.lm_head)
    # per layer: q 64·64 + k, v 64·32 each (2 kv heads of 16) + o 64·64 + MLP 3·64·128 + 2 norms
    # of 64 = 36992; 2 layers + final norm 64
    assert expected == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 64 * 128 + 128) + 64 == 74048
    assert shape == ModelShape(
        n_matmul_params=74048, n_layers=2, hidden_size=64, attn_dim=64, vocab_size=100
    )


def test_model_shape_gpt2_tied():
    config = build_model_config("gpt2", "tiny", vocab_size=100, max_position_embeddings=64)
    shape = ModelShape.from_hf_config(config)
    model = build_model(config)
    tr = model.transformer
    assert model.lm_head.weight is tr.wte.weight  # tied: the table is excluded once
    # learned position embeddings are a lookup table too, not matmul work
    expected = n_params(model) - n_params(tr.wte) - n_params(tr.wpe)
    # per layer: 2 layer norms 2·128, c_attn 64·192 + 192, attn c_proj 64·64 + 64,
    # c_fc 64·128 + 128, mlp c_proj 128·64 + 64 = 33472; 2 layers + ln_f 128
    assert expected == 2 * (256 + 12480 + 4160 + 8320 + 8256) + 128 == 67072
    assert shape == ModelShape(
        n_matmul_params=67072, n_layers=2, hidden_size=64, attn_dim=64, vocab_size=100
    )
