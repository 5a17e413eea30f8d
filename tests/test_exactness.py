"""Single-pass JEPA is exact: what the engine reads from a packed row equals separate forward
passes (DESIGN.md, "Single-pass JEPA, exactly"), for rotary (Llama) and learned absolute (GPT-2)
positions, fp32, eval mode, dense mask through SDPA and eager attention."""

import numpy as np
import pytest
import torch

from data_pipeline.packing import (
    IGNORE_INDEX,
    PackingConfig,
    SpecialIds,
    assemble_row,
    collate_rows,
    jepa_pairs,
    pack_rows,
)
from pretrain.loss import gather_pairs
from pretrain.model import build_model, build_model_config, forward_batch, load_pretrained

SPECIALS = SpecialIds(bos=1, eos=2, pad=0, view_sep=3, predictors=(4, 5, 6))
VOCAB = 48  # ids 8.. are ordinary tokens
SEQ_LEN = 160  # a record takes at most 53 tokens here, so a full row holds >= 3 of them
ATOL = 1e-5


def tiny_model(model_type: str, attn_impl: str = "sdpa", vocab_size: int = VOCAB):
    torch.manual_seed(0)
    config = build_model_config(
        model_type, "tiny", vocab_size=vocab_size, max_position_embeddings=SEQ_LEN,
        attn_implementation=attn_impl, bos_token_id=SPECIALS.bos, eos_token_id=SPECIALS.eos,
        pad_token_id=SPECIALS.pad,
    )  # fmt: skip
    return build_model(config).eval()


def run_alone(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (L, V), last hidden (L, H)) of ids as the only sequence: plain causal attention,
    positions 0..L-1, none of our mask code."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0]


def lm_document(views: list[np.ndarray]) -> list[int]:
    """[bos] v0 [sep] v1 … [eos]"""
    ids = [SPECIALS.bos]
    for j, view in enumerate(views):
        ids += [int(t) for t in view]
        ids.append(SPECIALS.eos if j == len(views) - 1 else SPECIALS.view_sep)
    return ids


def packed_batch(records, cfg: PackingConfig) -> dict[str, torch.Tensor]:
    rows, stats = pack_rows(records, cfg)
    assert stats.jepa_dropped_overlong == 0 and stats.truncated == 0
    assert min(len(row["sample_ids"]) for row in rows[:-1]) >= 3
    padding_row = assemble_row([], [], cfg)
    return {k: torch.as_tensor(v) for k, v in collate_rows([*rows, padding_row]).items()}


def expected_pairs(model, records, batch, k: int, pairs: str):
    """(pred, target, source) (P, H) from separate passes, in the batch's pair order."""
    predictors = list(SPECIALS.predictors[:k])
    pred, target, source = [], [], []
    for sid in batch["sample_ids"].tolist():
        views = records[sid]
        for s, t in jepa_pairs(len(views), pairs):
            src = [SPECIALS.bos, *map(int, views[s])]
            pred.append(run_alone(model, src + predictors)[1][-1])  # Pred(Enc(vs))
            target.append(run_alone(model, [SPECIALS.bos, *map(int, views[t])])[1][-1])
            source.append(run_alone(model, src)[1][-1])  # Enc(vs)
    return torch.stack(pred), torch.stack(target), torch.stack(source)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("n_views,pairs", [(2, "first"), (3, "chain")])
@pytest.mark.parametrize("readout", ["shared", "paper"])
def test_packed_row_equals_separate_passes(model_type, attn_impl, k, n_views, pairs, readout):
    """jepa.readout changes labels only: the embeddings and logits are the same in both modes."""
    rng = np.random.default_rng(100 * k + n_views)
    records = [
        [rng.integers(8, VOCAB, rng.integers(1, 9)) for _ in range(n_views)] for _ in range(10)
    ]
    pack = PackingConfig(SEQ_LEN, SPECIALS, predictor_tokens=k, pairs=pairs,
                         unlabelled_readout=readout == "paper")  # fmt: skip
    batch = packed_batch(records, pack)
    if readout == "paper":  # no position read as an embedding, nor any closer, is a target
        labels = batch["labels"]
        for name in ("pred_index", "target_index", "source_index"):
            assert (labels[batch["pair_batch_index"], batch[name]] == IGNORE_INDEX).all()
        assert not np.isin(labels, [SPECIALS.view_sep, SPECIALS.eos]).any()
    model = tiny_model(model_type, attn_impl)
    with torch.no_grad():
        logits, hidden = forward_batch(model, batch, attn_impl)

    # Padding (a whole padding row included) attends to itself: nothing is NaN.
    assert torch.isfinite(logits).all() and torch.isfinite(hidden).all()

    # (a) Pred(Enc(A)) and (b) Enc(B), plus Enc(A) itself, read at the pair indices.
    got = gather_pairs(hidden, batch)
    want = expected_pairs(model, records, batch, k, pairs)
    assert len(got[0]) == len(records) * (n_views - 1)
    for name, g, w in zip(("pred", "target", "source"), got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=f"{name} mismatch")

    # (c) LM logits at every position of every LM document.
    spans = batch["doc_spans"].tolist()
    for (b, start, end), sid in zip(spans, batch["sample_ids"].tolist()):
        doc = lm_document(records[sid])
        assert batch["input_ids"][b, start:end].tolist() == doc
        torch.testing.assert_close(
            logits[b, start:end], run_alone(model, doc)[0], atol=ATOL, rtol=0
        )


def test_tiny_configs_map_the_preset_onto_each_model_type():
    llama = tiny_model("llama").config
    assert (llama.hidden_size, llama.num_hidden_layers, llama.intermediate_size) == (64, 2, 128)
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)
    gpt2 = tiny_model("gpt2").config  # no grouped-query attention: kv heads dropped
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_inner, gpt2.n_positions) == (
        64, 2, 4, 128, SEQ_LEN,
    )  # fmt: skip
    assert gpt2.vocab_size == VOCAB and gpt2.eos_token_id == SPECIALS.eos
    with pytest.raises(ValueError, match="no attribute 'n_embd'"):
        build_model_config(
            "llama", vocab_size=VOCAB, max_position_embeddings=64, overrides={"n_embd": 8}
        )
    with pytest.raises(ValueError, match="size must be one of"):
        build_model_config("llama", "3b", vocab_size=VOCAB, max_position_embeddings=64)


def test_pretrained_checkpoint_with_added_predictor_tokens_keeps_its_logits(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB - 3)  # checkpoint without the predictors
    model.save_pretrained(tmp_path)
    ids = [SPECIALS.bos, 9, 10, 11, SPECIALS.eos]
    before = run_alone(model, ids)[0]

    grown = load_pretrained(tmp_path, vocab_size=VOCAB)  # tokenizer with predictors added
    assert grown.get_input_embeddings().num_embeddings == VOCAB
    assert grown.config.vocab_size == VOCAB
    torch.testing.assert_close(run_alone(grown, ids)[0][:, : VOCAB - 3], before, atol=1e-6, rtol=0)

    padded = load_pretrained(tmp_path, vocab_size=VOCAB - 5)  # padded vocab: never shrunk
    assert padded.get_input_embeddings().num_embeddings == VOCAB - 3

    with pytest.raises(ValueError, match="vocabulary mismatch"):
        load_pretrained(tmp_path, vocab_size=SPECIALS.eos)  # cannot even produce eos
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing", vocab_size=VOCAB)
