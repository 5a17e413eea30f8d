"""The NL-RX-SYNTH replication runs end to end in --quick mode (the pipeline, not the gap)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_module
from engine_fixtures import engine_env

pytestmark = pytest.mark.slow


def test_nlrx_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "nlrx"
    proc = run_module(
        "pretrain.experiments.nlrx", "--out", out, "--quick", env=engine_env(), timeout=600
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"lm", "l2_k3"} and summary["seeds"] == [82, 23]
    jepa = summary["arms"]["l2_k3"]["metrics"]
    for arm in summary["arms"].values():
        for name in ("prefix_match", "exact_match", "val_loss_lm", "cosine", "pred_cosine",
                     "pred_cosine_shuffled", "lstsq_residual", "effective_rank"):  # fmt: skip
            assert all(math.isfinite(v) for v in arm["metrics"][name]["values"]), name
        assert len(arm["singular_values_mean"]) > 0
    assert (
        "vs_lm" in jepa["prefix_match"]
        and "vs_lm" not in summary["arms"]["lm"]["metrics"]["prefix_match"]
    )
    for png in ("loss_curves.png", "singular_values.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "| LLM-JEPA λ=2 k=3 |" in (out / "summary.md").read_text() and "prefix match" in proc.stdout
    )
    # both arms logged the JEPA term at every logged step; the LM arm's is not trained on
    for name in ("lm_s82", "l2_k3_s82"):
        rows = [
            json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert all("loss/jepa" in r for r in rows if r["kind"] == "train")
    # a second call reuses every finished run
    again = run_module(
        "pretrain.experiments.nlrx", "--out", out, "--quick", env=engine_env(), timeout=600
    )
    assert again.stdout.count(" s)") == 4 and "(0 s)" in again.stdout
    # settings are chosen on the validation records: the same runs, scored on valid.jsonl (the
    # training records the preprocessing split held out), with no run trained again
    valid = run_module(
        "pretrain.experiments.nlrx", "--out", out, "--quick", "--split", "valid",
        env=engine_env(), timeout=600,
    )  # fmt: skip
    held = (out / "valid.jsonl").read_text().splitlines()
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert len(held) == manifest["splits"]["val"]["records"] == 168
    assert "NL-RX-SYNTH valid (100 pairs)" in valid.stdout
    v = json.loads((out / "summary_valid.json").read_text())
    assert v["meta"]["split"] == "valid" and set(v["arms"]) == {"lm", "l2_k3"}
    assert all((out / "runs" / n / "eval_valid.json").exists() for n in ("lm_s82", "l2_k3_s23"))
    assert sorted(p.name for p in (out / "runs" / "lm_s82" / "checkpoints").glob("step_*")) == [
        "step_000030"
    ]
    # a trend over summaries (here the same one twice, as two "sizes")
    trend = run_module(
        "pretrain.experiments.trend", "--arm", "l2_k3", "--out", out / "trend.png",
        f"small={out / 'summary.json'}", f"large={out / 'summary_valid.json'}",
    )  # fmt: skip
    d = jepa["prefix_match"]["vs_lm"]["mean_diff"]
    assert (
        f"| small | {summary['arms']['lm']['metrics']['prefix_match']['mean']:.2f}" in trend.stdout
    )
    assert f"| {d:+.2f} ± " in trend.stdout and "| large |" in trend.stdout
    assert (out / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_module("pretrain.experiments.trend", "--arm", "nope", f"x={out / 'summary.json'}",
                     check=False)  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        f"trend: {out / 'summary.json'} has no arm 'nope' (arms: lm, l2_k3)"
    ]


def test_grid_variants_name_their_arms_and_overrides():
    from pretrain.experiments.nlrx import parse_arms

    lm, plain, paper = parse_arms("2:3,2:3:paper_sigreg")
    assert (lm.name, plain.name, paper.name) == ("lm", "l2_k3", "l2_k3_paper_sigreg")
    assert paper.overrides == ("jepa.readout=paper", "jepa.regularizer=sigreg")
    assert plain.overrides == () and lm.overrides == ()
    with pytest.raises(RuntimeError, match="unknown variant 'nope'"):
        parse_arms("2:3:nope")
    _, beta, flop = parse_arms("2:3:sigreg@0.3,lm@1.5")
    assert beta.name == "l2_k3_sigreg_b0.3" and beta.overrides[-1] == "jepa.regularizer_weight=0.3"
    assert (flop.name, flop.weight, flop.steps(600), flop.overrides) == ("lm_x1.5", 0, 900, ())


def test_finetune_protocol_starts_every_arm_from_one_base(tmp_path):
    """A base pretrained LM-only on the other corpora, exported, then fine-tuned on NL-RX-SYNTH by
    both arms from the same weights with the base's tokenizer."""
    out = tmp_path / "ft"
    run_module(
        "pretrain.experiments.finetune", "--out", out, "--grid", "2:3", "--seeds", "82",
        "--base_steps", "20", "--steps", "20", "--limit", "40", env=engine_env(), timeout=900,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"lm", "l2_k3"} and summary["base"]["steps"] == 20
    assert math.isfinite(summary["base"]["val_loss_lm"])
    base = json.loads((out / "base" / "config.json").read_text())
    assert base["jepa"]["objective"] == "none"
    manifest = json.loads((out / "base_shards" / "manifest.json").read_text())
    assert [i["path"].rsplit("/", 2)[-2] for i in manifest["inputs"]] == [
        "rotten_tomatoes", "spider", "nq_open"
    ]  # fmt: skip
    for arm in ("lm", "l2_k3"):
        cfg = json.loads((out / "runs" / f"{arm}_s82" / "config.json").read_text())
        assert cfg["model"]["init_from"] == str((out / "base" / "hf").resolve())
        assert cfg["data"]["paths"] == [str((out / "shards").resolve())]
    shards = json.loads((out / "shards" / "manifest.json").read_text())
    assert shards["tokenizer"]["hash"] == manifest["tokenizer"]["hash"]
