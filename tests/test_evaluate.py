"""pretrain.evaluate: generation scores, representation metrics, bad input, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BUNDLED, chat, run_module, write_jsonl

from pretrain.evaluate import _buckets, evaluate, representation_metrics

TEST_JSONL = BUNDLED / "test.jsonl"


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    """A randomly initialised tiny Llama saved with the project's tokenizer, as export writes it."""
    from transformers import AutoTokenizer

    from pretrain.model import build_model, build_model_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = build_model_config(vocab_size=len(tok), max_position_embeddings=256,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    out = tmp_path_factory.mktemp("evalmodel") / "hf"
    build_model(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_buckets_hold_equal_lengths_only():
    lengths = [3, 5, 3, 3, 5, 4]
    batches = _buckets(lengths, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len({lengths[i] for i in b}) == 1 and len(b) <= 2 for b in batches)


def test_batched_evaluation_equals_one_pair_at_a_time(model_dir):
    kw = dict(limit=24, progress=False, show_examples=24, predictor_tokens=2)
    one = evaluate(model_dir, str(TEST_JSONL), batch_size=1, **kw)
    many = evaluate(model_dir, str(TEST_JSONL), batch_size=16, **kw)
    assert [e["generated"] for e in one["examples"]] == [e["generated"] for e in many["examples"]]
    for key in ("cosine", "pred_cosine", "lstsq_residual"):
        assert one[key] == pytest.approx(many[key], rel=1e-5, abs=1e-6)
    assert np.allclose(one["singular_values"], many["singular_values"], rtol=1e-5)


def test_exact_and_prefix_match(model_dir, tmp_path):
    """References set to the model's own greedy output: both scores are 100 with the same
    budget; with a longer budget the generation runs on past the reference (a random model does
    not stop): prefix match stays 100, exact match counts only the pairs that stopped."""
    first = evaluate(model_dir, str(TEST_JSONL), limit=12, max_new_tokens=6, show_examples=12,
                     progress=False)  # fmt: skip
    refs = [e["generated"].strip() for e in first["examples"]]
    assert all(refs)
    data = write_jsonl(
        tmp_path / "own.jsonl", [chat(e["a"], r) for e, r in zip(first["examples"], refs)]
    )
    same = evaluate(model_dir, str(data), max_new_tokens=6, progress=False)
    assert same["exact_match"] == 100.0 and same["prefix_match"] == 100.0
    longer = evaluate(model_dir, str(data), max_new_tokens=12, show_examples=12, progress=False)
    assert longer["prefix_match"] == 100.0
    stopped = [len(e["generated"]) == len(r) for e, r in zip(longer["examples"], refs)]
    assert longer["exact_match"] == pytest.approx(100.0 * np.mean(stopped))
    assert first["exact_match"] < 100.0  # the bundled references are not what a random model says


def test_representation_metrics_on_known_maps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    linear = representation_metrics(a, a @ rng.normal(size=(16, 16)), top=4)
    assert linear["lstsq_residual"] < 1e-8 and linear["lstsq_well_posed"]
    same = representation_metrics(a, a.copy(), top=4)
    assert same["cosine"] == pytest.approx(1.0) and max(same["singular_values"]) < 1e-12
    assert abs(same["cosine_shuffled"]) < 0.2
    # collapse: every B embedded alike is "predicted" with a small raw residual (through the
    # common component of A, as in a real model), but nothing explains its (tiny) spread
    const = np.ones((200, 16)) + 1e-3 * rng.normal(size=(200, 16))
    collapsed = representation_metrics(a + 3.0, const, top=4)
    assert collapsed["cosine_b_b"] > 0.99 and collapsed["lstsq_residual_relative"] < 0.1
    assert collapsed["lstsq_residual_centered"] > 0.9
    affine = representation_metrics(a, a @ rng.normal(size=(16, 16)) + 5.0, top=4)
    assert affine["lstsq_residual_centered"] < 1e-8
    b = rng.normal(size=(200, 16))
    noise = representation_metrics(a, b, top=16)
    assert noise["singular_values"] == pytest.approx(list(np.linalg.svd(a - b, compute_uv=False)))
    assert 0.5 < noise["lstsq_residual_relative"] < 1.0


def test_cli_writes_json_and_counts_bad_records(model_dir, tmp_path):
    good = [json.loads(line) for line in TEST_JSONL.read_text().splitlines()[:30]]
    data = write_jsonl(tmp_path / "mixed.jsonl",
                       [good[0], "{not json", {"messages": [{"role": "user", "content": "x"}]}, *good[1:]])  # fmt: skip
    out = tmp_path / "res.json"
    proc = run_module("pretrain.evaluate", model_dir, data, "--out", out, "--predictor_tokens", 1,
                      "--batch_size", 8)  # fmt: skip
    r = json.loads(out.read_text())
    assert r["pairs"] == 30 and sum(r["skipped"].values()) == 2
    assert any("mixed.jsonl:2" in s for s in r["first_skips"])
    for key in (
        "exact_match",
        "prefix_match",
        "cosine",
        "pred_cosine",
        "pred_cosine_shuffled",
        "cosine_b_b",
        "lstsq_residual_centered",
        "lstsq_residual",
    ):
        assert np.isfinite(r[key]), key
    svals = r["singular_values"]
    assert len(svals) == min(30, 64) and svals == sorted(svals, reverse=True)  # N = 30 < H
    assert "prefix match" in proc.stdout and "lstsq residual" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nope", str(TEST_JSONL)], "not a Hugging Face model folder"),
        (["{model}", "{tmp}/missing.jsonl"], "missing.jsonl"),
        (["{model}", str(TEST_JSONL), "--view_b", "5"], "--view_b 5"),
        (["{model}", str(TEST_JSONL), "--predictor_tokens", "99"], "--predictor_tokens 99"),
        (["{model}", str(TEST_JSONL), "--bogus", "1"], "unexpected keyword argument 'bogus'"),
    ],
)
def test_cli_bad_input_is_one_line(model_dir, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, model=model_dir) for a in args]
    proc = run_module("pretrain.evaluate", *args, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()
    assert last and message in last[-1] and "Traceback" not in proc.stderr, proc.stderr
