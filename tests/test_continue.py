"""Continued pretraining from Hugging Face checkpoints the run did not create, end to end on CPU.

Two sources: (a) the export of an earlier run (a Llama with an untied LM head, whose tokenizer
has no predictor tokens) and (b) a GPT-2 written by transformers' `save_pretrained` (tied
embeddings, a byte-level BPE tokenizer without pad, view separator or predictor tokens). Each
tokenizer is extended with `python -m data_pipeline.tokenizer extend`, a slice of the bundled
corpus the checkpoints never saw is preprocessed with it, and recipes/continue_cpu.yaml continues
(a) with LLM-JEPA and (b) with STP: 2 ranks, ZeRO-3, fp32, `model.init_from=DIR`.
"""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLED, run_module
from engine_fixtures import REPO, TINY, launch, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow

RECIPE = REPO / "recipes" / "continue_cpu.yaml"
STEPS = 6
EOT = "<|endoftext|>"


def head(src: Path, dst: Path, n: int) -> Path:
    """The first n records of a JSONL file: a slice of the bundled corpus."""
    with open(src) as f:
        dst.write_text("".join(islice(f, n)))
    return dst


def train_gpt2_tokenizer(texts: list[str], out: Path, vocab_size: int = 400) -> None:
    """A GPT-2-style tokenizer: byte-level BPE, one special token that is bos, eos and unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT,
                                  unk_token=EOT, clean_up_tokenization_spaces=False)  # fmt: skip
    tok.save_pretrained(out)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("continue")
    head(BUNDLED / "test.jsonl", root / "base.jsonl", 400)  # what (a) was trained on
    head(BUNDLED / "train.jsonl", root / "new.jsonl", 400)  # the corpus pretraining continues on
    return root


@pytest.fixture(scope="module")
def checkpoint_a(work) -> Path:
    """An earlier run's export: tokenizer (view separator, no predictors) → shards → 30 LM-only
    steps of the tiny Llama in one process → pretrain.export."""
    from data_pipeline.preprocess import preprocess
    from data_pipeline.sources import iter_view_texts
    from data_pipeline.tokenizer import train_tokenizer
    from pretrain.export import export

    base = work / "base.jsonl"
    train_tokenizer(iter_view_texts(str(base), "messages"), work / "tok_a", vocab_size=400,
                    num_predictor_tokens=0)  # fmt: skip
    preprocess(str(base), "messages", str(work / "tok_a"), str(work / "shards_base"),
               val_fraction=0.05, progress=False)  # fmt: skip
    overrides = tiny_overrides(work / "shards_base", work / "run_base", **{
        "jepa.objective": "none", "jepa.predictor_tokens": 0, "schedule.train_steps": 30,
        "logging.eval_every_steps": 0, "checkpoint.save_every_steps": 0,
        "logging.log_every_steps": 10})  # fmt: skip
    launch(overrides, nproc=1, launcher="python", recipe=TINY)
    return export(work / "run_base", work / "a_hf")


@pytest.fixture(scope="module")
def checkpoint_b(work) -> Path:
    """A tiny GPT-2 (tied embeddings) and its tokenizer, written by save_pretrained. Weights of
    std 0.1 instead of 0.02: its predictions are far from uniform, so wrong weights would show."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from data_pipeline.sources import iter_view_texts

    out = work / "b_hf"
    train_gpt2_tokenizer(list(iter_view_texts(str(work / "base.jsonl"), "messages")), out)
    tok = AutoTokenizer.from_pretrained(out)
    eot = tok.convert_tokens_to_ids(EOT)
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
                        initializer_range=0.1)  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def extended(work, checkpoint_a, checkpoint_b) -> dict[str, Path]:
    """Each checkpoint's tokenizer extended by the CLI, and the new corpus preprocessed with it."""
    from data_pipeline.preprocess import preprocess

    out = {}
    for name, ckpt in (("a", checkpoint_a), ("b", checkpoint_b)):
        tok = work / f"tok_{name}_extended"
        run_module("data_pipeline.tokenizer", "extend", "--src", ckpt, "--out", tok)
        preprocess(str(work / "new.jsonl"), "messages", str(tok), str(work / f"shards_{name}"),
                   val_fraction=0.1, progress=False)  # fmt: skip
        out[name] = work / f"shards_{name}"
    return out


def continue_overrides(shards: Path, run_dir: Path, init_from: Path, **extra) -> list[str]:
    return tiny_overrides(shards, run_dir, **{
        "model.init_from": init_from, "schedule.train_steps": STEPS,
        "logging.eval_every_steps": STEPS, "checkpoint.save_every_steps": 0, **extra})  # fmt: skip


@pytest.fixture(scope="module")
def runs(work, checkpoint_a, checkpoint_b, extended) -> dict[str, Path]:
    """(a) with LLM-JEPA, (b) with STP: 2 ranks, ZeRO-3, the continue recipe."""
    sources = {"a": (checkpoint_a, {}), "b": (checkpoint_b, {"jepa.objective": "stp"})}
    out = {}
    for name, (ckpt, extra) in sources.items():
        run_dir = work / f"run_{name}"
        launch(continue_overrides(extended[name], run_dir, ckpt, **extra), recipe=RECIPE)
        out[name] = run_dir
    return out


# --------------------------------------------------------------------------------------------
# The tokenizers


def test_extend_keeps_the_checkpoint_ids_and_appends_the_specials(extended, work):
    from data_pipeline.tokenizer import extension_mismatch, load_tokenizer, special_token_ids

    # (a) has a view separator and no predictors; (b) lacks pad and the view separator too
    for name, added in (("a", 8), ("b", 10)):
        base = load_tokenizer(work / f"{name}_hf").get_vocab()
        tok = load_tokenizer(extended[name] / "tokenizer")
        vocab = tok.get_vocab()
        assert len(vocab) == len(base) + added
        assert {t: vocab[t] for t in base} == base
        assert extension_mismatch(base, vocab) is None
        ids = special_token_ids(tok)
        assert ids["predictors"] == list(range(len(vocab) - 8, len(vocab)))
        assert ids["view_sep"] >= len(base) if name == "b" else ids["view_sep"] < len(base)
    gpt2 = load_tokenizer(work / "b_hf").get_vocab()
    ids = special_token_ids(load_tokenizer(extended["b"] / "tokenizer"))
    assert ids["bos"] == ids["eos"] == ids["unk"] == gpt2[EOT]  # GPT-2's one special kept
    assert ids["pad"] >= len(gpt2)


def test_a_tokenizer_of_another_model_is_refused_in_one_line(extended, checkpoint_a):
    """Shards made with (b)'s tokenizer cannot continue (a): exit 2, one line, no traceback."""
    proc = launch(
        continue_overrides(extended["b"], checkpoint_a.parent / "run_refused", checkpoint_a),
        nproc=1, launcher="python", recipe=RECIPE, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "is not the tokenizer of model.init_from" in lines[0]
    assert str(checkpoint_a) in lines[0] and "data_pipeline.tokenizer extend" in lines[0]
    assert not (checkpoint_a.parent / "run_refused" / "checkpoints").exists()


def test_init_from_checks_read_files_only(extended, checkpoint_a, checkpoint_b, tmp_path):
    """The checks behind the refusal, and a checkpoint without a tokenizer: a warning, and on."""
    from pretrain.model import check_init_from

    tok_a, tok_b = extended["a"] / "tokenizer", extended["b"] / "tokenizer"
    n_a, n_b = (json.loads((extended[k] / "manifest.json").read_text())["tokenizer"]["vocab_size"]
                for k in "ab")  # fmt: skip
    assert check_init_from(checkpoint_a, tok_a, n_a) == []
    assert check_init_from(checkpoint_b, tok_b, n_b) == []
    with pytest.raises(ValueError, match=r"not the tokenizer of .* of the base's \d+ tokens"):
        check_init_from(checkpoint_b, tok_a, n_a)
    bare = tmp_path / "no_tokenizer"  # weights and config only
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint_b / name, bare)
    (warning,) = check_init_from(bare, tok_a, n_a)
    assert "has no tokenizer" in warning and str(bare) in warning
    with pytest.raises(ValueError, match="no config.json"):
        check_init_from(tmp_path, tok_b, n_b)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        check_init_from(checkpoint_b, tok_b, 0)  # cannot even produce the checkpoint's eos


def test_overrides_cannot_reshape_a_checkpoint(checkpoint_a):
    """model.overrides reach the loaded model; one that would change a weight's shape is refused
    in one line instead of building a config the checkpoint does not fit (export would fail)."""
    from pretrain.config import ConfigError, TrainConfig
    from pretrain.engine import SpecialIdsInfo, build_hf_config

    cfg = TrainConfig()
    cfg.model.init_from = str(checkpoint_a)
    ids = SpecialIdsInfo(vocab_size=0, bos=1, eos=2, pad=3)
    hidden = json.loads((checkpoint_a / "config.json").read_text())["hidden_size"]
    cfg.model.overrides = {"hidden_size": hidden, "attention_dropout": 0.25}
    hf = build_hf_config(cfg, ids)
    assert hf.hidden_size == hidden and hf.attention_dropout == 0.25
    cfg.model.overrides = {"hidden_size": hidden + 8}
    with pytest.raises(
        ConfigError, match=rf"hidden_size={hidden + 8}: .* has hidden_size={hidden}"
    ):
        build_hf_config(cfg, ids)


# --------------------------------------------------------------------------------------------
# The weights


def test_new_rows_are_the_mean_of_the_checkpoint_rows(extended, checkpoint_a, checkpoint_b):
    """(a) untied: new input-embedding and LM-head rows are their matrices' means; (b) tied: the
    head stays the embedding. Old rows as saved."""
    from transformers import AutoModelForCausalLM

    from pretrain.model import load_pretrained

    for name, ckpt in (("a", checkpoint_a), ("b", checkpoint_b)):
        vocab = json.loads((extended[name] / "manifest.json").read_text())["tokenizer"]
        src = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
        model = load_pretrained(ckpt, vocab_size=vocab["vocab_size"])
        old = src.get_input_embeddings().num_embeddings
        pairs = [(src.get_input_embeddings().weight, model.get_input_embeddings().weight),
                 (src.get_output_embeddings().weight, model.get_output_embeddings().weight)]  # fmt: skip
        for before, after in pairs:
            assert after.shape == (vocab["vocab_size"], before.shape[1])
            assert torch.equal(after[:old], before)
            mean = before.double().mean(0).float()
            assert torch.equal(after[old:], mean.expand(after.shape[0] - old, -1))
        assert min(vocab["special_ids"]["predictors"]) >= old  # the predictors are new rows
        tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
        assert tied == (name == "b")


def reference_model(ckpt: Path, vocab_size: int) -> torch.nn.Module:
    """The checkpoint in plain transformers, its embedding grown as documented: new rows (and
    new LM-head rows) = the mean of the old ones."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True).eval()
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for w in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            w[old:] = w[:old].double().mean(0).float()
    return model


def last_hidden(model: torch.nn.Module, ids: np.ndarray) -> torch.Tensor:
    """(L, H) final-norm hidden states of one sequence run alone."""
    return model.base_model(input_ids=torch.from_numpy(ids)[None]).last_hidden_state[0]


@torch.no_grad()
def reference_eval(run_dir: Path, ckpt: Path, world_size: int = 2) -> dict[str, float]:
    """eval/loss_lm (and eval/loss_jepa) of the run's validation batches, computed with plain
    transformers on every sequence alone: each LM document from its start; each JEPA target
    view alone; each predictor segment after its source prefix. No packing, no attention mask."""
    from data_pipeline.dataset import PackedDataset
    from pretrain.config import config_from_dict

    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    with_jepa = cfg.jepa.objective == "jepa"
    ds_args = dict(seq_len=cfg.data.seq_len_tokens, predictor_tokens=cfg.jepa.predictor_tokens,
                   pairs=cfg.data.pairs, records_per_row=cfg.data.records_per_row,
                   packing_window=cfg.data.packing_window, readout=cfg.jepa.readout,
                   overlong=cfg.data.overlong, split="val", seed=cfg.seed, world_size=world_size,
                   shuffle=False, loop=True)  # fmt: skip
    model = None
    lm_sum, lm_n, jepa_sum, pairs = 0.0, 0, 0.0, 0
    for rank in range(world_size):
        ds = PackedDataset(cfg.data.paths, rank=rank, **ds_args)
        model = model or reference_model(ckpt, ds.vocab_size)
        for _ in range(cfg.logging.eval_batches):
            b = ds.next_batch(cfg.data.micro_batch_rows, with_jepa)
            counted = 0
            for row, start, end in b["doc_spans"]:
                assert (b["position_ids"][row, start:end] == np.arange(end - start)).all()
                labels = torch.from_numpy(b["labels"][row, start:end])
                logits = model(input_ids=torch.from_numpy(b["input_ids"][row, start:end])[None])
                lm_sum += torch.nn.functional.cross_entropy(
                    logits.logits[0].double(), labels, ignore_index=-100, reduction="sum"
                ).item()
                counted += int((labels != -100).sum())
            assert counted == int((b["labels"] != -100).sum())  # no label outside a document
            lm_n += counted
            for row, p, t in zip(b["pair_batch_index"], b["pred_index"], b["target_index"]):
                seg, ids = b["segment_ids"][row], b["input_ids"][row]
                a0, a1 = b["attend_start"][row, p], b["attend_end"][row, p]
                pred_ids = np.concatenate([ids[a0:a1], ids[: p + 1][seg[: p + 1] == seg[p]]])
                target_ids = ids[: t + 1][seg[: t + 1] == seg[t]]
                pred = last_hidden(model, pred_ids)[-1]
                target = last_hidden(model, target_ids)[-1]
                jepa_sum += 1 - torch.nn.functional.cosine_similarity(pred, target, dim=0).item()
                pairs += 1
    out = {"eval/loss_lm": lm_sum / lm_n}
    if with_jepa:
        assert pairs > 0
        out["eval/loss_jepa"] = jepa_sum / pairs
    return out


@pytest.mark.parametrize("name", ["a", "b"])
def test_step0_eval_equals_the_checkpoint_in_plain_transformers(runs, checkpoint_a, checkpoint_b,
                                                                name):  # fmt: skip
    """The weights arrive exactly: the run's step-0 validation losses (before any update) are the
    source checkpoint's on the same batches, every sequence run alone in transformers."""
    ckpt = {"a": checkpoint_a, "b": checkpoint_b}[name]
    step0 = read_metrics(runs[name], "eval")[0]
    assert step0["step"] == 0
    expected = reference_eval(runs[name], ckpt)
    for key, value in expected.items():
        print(f"{name}: step-0 {key}: engine {step0[key]:.7f}, transformers {value:.7f}")
        assert step0[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("name", ["a", "b"])
def test_the_loss_falls(runs, name):
    train, evals = read_metrics(runs[name]), read_metrics(runs[name], "eval")
    assert [r["step"] for r in train] == list(range(STEPS))
    assert [e["step"] for e in evals] == [0, STEPS]
    assert evals[-1]["eval/loss_lm"] < evals[0]["eval/loss_lm"]  # the same batches
    assert train[-1]["loss/total"] < train[0]["loss/total"]
    aux = "loss/jepa" if name == "a" else "loss/stp"
    assert all(np.isfinite(r[aux]) for r in train)


@pytest.mark.parametrize("name", ["a", "b"])
def test_the_export_loads_and_generates(runs, extended, name, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.export import export

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export(runs[name], tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(tok) == model.get_input_embeddings().num_embeddings
    shards_tok = AutoTokenizer.from_pretrained(extended[name] / "tokenizer", local_files_only=True)
    assert tok.get_vocab() == shards_tok.get_vocab()
    assert model.config.tie_word_embeddings == (name == "b")
    ids = tok("lines with a vowel", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=False).strip()
