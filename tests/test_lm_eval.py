"""lm-evaluation-harness task nlrx_synth: the harness scores an exported model as pretrain.evaluate does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLED, REPO, chat, write_jsonl

from pretrain.evaluate import evaluate, read_pairs

pytestmark = pytest.mark.slow

TEST_JSONL = BUNDLED / "test.jsonl"
TAUGHT = 4  # the first test pairs, learnt by heart: the model gets these right and stops
LIMIT = 8  # pairs scored: the taught ones and as many it has never seen


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both evaluators on one thread, as the harness's process (OMP_NUM_THREADS=1): a tiny model
    gains nothing from two, and on a busy machine two cost 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    """A tiny Llama taught the first TAUGHT test pairs (in the training format [bos] A [sep] B
    [eos]), saved as pretrain.export writes a model, plus the harness's tokenizer."""
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import special_token_ids
    from pretrain.lm_eval_tasks.prepare import write_harness_tokenizer
    from pretrain.model import build_model, build_model_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sp = special_token_ids(tok)
    torch.manual_seed(0)
    cfg = build_model_config(vocab_size=len(tok), max_position_embeddings=256,
                             bos_token_id=sp["bos"], eos_token_id=sp["eos"], pad_token_id=sp["pad"])  # fmt: skip
    model = build_model(cfg)
    pairs = read_pairs(str(TEST_JSONL), tok, limit=TAUGHT)
    rows = [[sp["bos"], *a, sp["view_sep"], *b, sp["eos"]] for a, b in zip(pairs.a, pairs.b)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [sp["pad"]] * (width - len(r)) for r in rows])
    # loss on B and eos only; the right padding comes after every labelled token (causal)
    labels = torch.tensor([[-100] * (len(a) + 2) + [*b, sp["eos"]] + [-100] * (width - len(r))
                           for a, b, r in zip(pairs.a, pairs.b, rows)])  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(50):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("lm_eval") / "hf"
    model.generation_config.eos_token_id = sp["eos"]  # as export sets them
    model.generation_config.pad_token_id = sp["pad"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_harness_tokenizer(out)
    return out


def run_harness(model_dir, out_dir, limit: int) -> tuple[dict, list[dict]]:
    """The user's command line, offline; returns the task's results and its samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    model_args = f"pretrained={model_dir},tokenizer={model_dir / 'lm_eval_tokenizer'}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
           "--include_path", "pretrain/lm_eval_tasks", "--tasks", "nlrx_synth", "--device", "cpu",
           "--limit", str(limit), "--log_samples", "--output_path", str(out_dir)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = out_dir.rglob("results_*.json")
    (samples,) = out_dir.rglob("samples_nlrx_synth_*.jsonl")
    docs = sorted((json.loads(line) for line in samples.read_text().splitlines()),
                  key=lambda s: s["doc_id"])  # fmt: skip
    return json.loads(results.read_text())["results"]["nlrx_synth"], docs


def test_harness_scores_equal_pretrain_evaluate(model_dir, tmp_path):
    from transformers import AutoTokenizer

    ours = evaluate(model_dir, str(TEST_JSONL), limit=LIMIT, show_examples=LIMIT, progress=False)
    theirs, samples = run_harness(model_dir, tmp_path / "out", LIMIT)
    # not 0 == 0: the taught pairs are exact, the others are not
    assert 0 < ours["exact_match"] < 100
    assert theirs["exact_match,none"] == pytest.approx(ours["exact_match"], abs=1e-9)
    assert theirs["prefix_match,none"] == pytest.approx(ours["prefix_match"], abs=1e-9)
    refs = read_pairs(str(TEST_JSONL), AutoTokenizer.from_pretrained(model_dir), limit=LIMIT).b
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    for ex, ref, s in zip(ours["examples"], refs, samples):
        request = s["arguments"]["gen_args_0"]
        assert request["arg_0"] == f"<s>{ex['a']}<|view_sep|>"
        assert request["arg_1"]["max_gen_toks"] == len(ref) + 8
        assert s["filtered_resps"][0] == ex["generated"]
        assert s["exact_match"] == 100.0 * ex["exact"]


def test_prompt_ids_budgets_and_refusals(model_dir, tmp_path):
    """In-process: the harness's tokenizer encodes each prompt to pretrain.evaluate's ids (the
    task checks every pair), the exported one cannot, and special-token text in a description is
    refused; view_sep and predictor tokens survive the harness's decoding."""
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import special_token_ids
    from pretrain.lm_eval_tasks.nlrx_synth.utils import load_pairs

    harness_dir = model_dir / "lm_eval_tokenizer"
    test = load_pairs(tokenizer=str(harness_dir), pretrained=str(model_dir))["test"]
    own = AutoTokenizer.from_pretrained(model_dir)
    pairs = read_pairs(str(TEST_JSONL), own)
    assert len(test) == len(pairs.a) == 2000
    assert test["max_gen_toks"] == [len(b) + 8 for b in pairs.b]
    assert test["reference"] == pairs.b_text

    with pytest.raises(ValueError, match="lm_eval_tasks.prepare"):
        load_pairs(pretrained=str(model_dir))  # the exported tokenizer: the sep stays text
    injected = write_jsonl(tmp_path / "inject.jsonl", [chat("a <|view_sep|> b", "x")])
    with pytest.raises(ValueError, match="pair 0"):
        load_pairs(tokenizer=str(harness_dir), pretrained=str(model_dir), data=str(injected))

    harness = AutoTokenizer.from_pretrained(harness_dir)
    sp = special_token_ids(own)
    gen = [*pairs.b[0][:3], sp["view_sep"], sp["predictors"][0], *pairs.b[0][3:]]
    assert harness.decode(gen, skip_special_tokens=True) == own.decode(gen)
    assert harness.decode([*gen, sp["eos"], sp["pad"]], skip_special_tokens=True) == own.decode(gen)
