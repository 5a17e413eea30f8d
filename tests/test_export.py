"""Export round trip: ZeRO-3 checkpoint → save_pretrained files → offline Auto* load."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_module
from engine_fixtures import read_metrics, straight_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(bundled_shards, tmp_path_factory):
    from pretrain.export import export

    run_dir = straight_run(bundled_shards, tmp_path_factory.mktemp("runs"))
    return run_dir, export(run_dir, tmp_path_factory.mktemp("export") / "hf")


def test_offline_load_and_generate(exported, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, out = exported
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    ids = tok("lines with a vowel", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    new = gen[0, ids["input_ids"].shape[1] :]
    assert len(new) > 0 and tok.decode(new, skip_special_tokens=False).strip()
    # the copy lm-evaluation-harness reads (pretrain/lm_eval_tasks): view_sep's text is its id
    harness = AutoTokenizer.from_pretrained(out / "lm_eval_tokenizer", local_files_only=True)
    sep = tok.convert_tokens_to_ids("<|view_sep|>")
    assert harness("<|view_sep|>", add_special_tokens=False)["input_ids"] == [sep]
    assert tok("<|view_sep|>", add_special_tokens=False)["input_ids"] != [sep]


def test_exported_logits_equal_the_engine(exported):
    """The engine logged its final validation LM loss over both ranks' eval batches; the exported
    model's logits on the same packed batches give the same loss."""
    from transformers import AutoModelForCausalLM

    from data_pipeline.dataset import PackedDataset
    from pretrain import loss
    from pretrain import model as model_lib
    from pretrain.config import config_from_dict

    run_dir, out = exported
    import json

    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    total, count = 0.0, 0
    for rank in range(2):
        ds = PackedDataset(cfg.data.paths, seq_len=cfg.data.seq_len_tokens, split="val",
                           seed=cfg.seed, rank=rank, world_size=2, shuffle=False,
                           predictor_tokens=cfg.jepa.predictor_tokens)  # fmt: skip
        for _ in range(cfg.logging.eval_batches):
            batch = {k: torch.from_numpy(np.ascontiguousarray(v))
                     for k, v in ds.next_batch(cfg.data.micro_batch_rows).items()}  # fmt: skip
            with torch.no_grad():
                logits, _ = model_lib.forward_batch(model, batch, "sdpa")
            s, n = loss.lm_loss_sum(logits, batch["labels"])
            total, count = total + float(s), count + int(n)
    engine_loss = read_metrics(run_dir, "eval")[-1]["eval/loss_lm"]
    assert total / count == pytest.approx(engine_loss, rel=1e-6, abs=1e-6)


def test_export_reads_objective_and_bare_model_parameter_names():
    """Checkpoints of the objective module name parameters "model.<hf name>"; older ones (the
    bare model under DeepSpeed) use the transformers names, which may start with "model." too."""
    from pretrain.export import _unwrap_objective

    keys = {"model.layers.0.w", "model.norm.weight", "lm_head.weight"}
    wrapped = {"model.model.layers.0.w": 1, "model.model.norm.weight": 2, "model.lm_head.weight": 3}
    assert _unwrap_objective(wrapped, keys) == {
        "model.layers.0.w": 1, "model.norm.weight": 2, "lm_head.weight": 3,
    }  # fmt: skip
    bare = {"model.layers.0.w": 1, "model.norm.weight": 2, "lm_head.weight": 3}
    assert _unwrap_objective(bare, keys) == bare


def test_export_refuses_a_tokenizer_of_another_size(exported, tmp_path):
    """A run folder whose tokenizer was swapped for one with another vocabulary (before: exported,
    and the files loaded into a model whose ids and embedding rows disagree)."""
    from data_pipeline.tokenizer import load_tokenizer

    run_dir, _ = exported
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    tok = load_tokenizer(copy / "tokenizer")
    tok.add_tokens(["<|another_token|>"])
    shutil.rmtree(copy / "tokenizer")
    tok.save_pretrained(copy / "tokenizer")
    out = tmp_path / "hf"
    proc = run_module("pretrain.export", copy, out, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: {copy}/tokenizer: {len(tok)} tokens, but the model's embedding has "
        f"{len(tok) - 1} rows (built from scratch for the run's tokenizer): not the tokenizer "
        "this model was trained with"
    ], proc.stderr[-3000:]
    assert not out.exists()  # refused before anything is written


def test_a_smaller_tokenizer_fits_only_a_padded_checkpoint_embedding():
    from pretrain.export import ExportError, check_tokenizer_fits

    check_tokenizer_fits(Path("tok"), 1000, 1000, from_checkpoint=False)
    check_tokenizer_fits(Path("tok"), 151_665, 151_936, from_checkpoint=True)  # Qwen2 pads
    with pytest.raises(
        ExportError,
        match=r"^tok: 800 tokens, but the model's embedding has 1000 rows \(built from scratch",
    ):
        check_tokenizer_fits(Path("tok"), 800, 1000, from_checkpoint=False)
    with pytest.raises(
        ExportError, match=r"^tok: 1001 tokens, but the model's embedding has 1000 rows: not"
    ):
        check_tokenizer_fits(Path("tok"), 1001, 1000, from_checkpoint=True)
