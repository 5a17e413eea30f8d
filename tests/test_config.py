"""Config tree: recipes, strict overrides, validation, DeepSpeed dict, schedules, dry run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pretrain.batches import jepa_rows_at
from pretrain.config import (
    REPO_ROOT,
    ConfigError,
    TrainConfig,
    build_deepspeed_config,
    config_from_dict,
    config_to_dict,
    global_batch_rows,
    load_config,
)
from pretrain.engine import estimate_memory
from pretrain.trainer import lr_at

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.y*ml")) + sorted(
    (REPO_ROOT / "recipes").glob("*.json")
)


def test_defaults_are_valid_and_round_trip():
    cfg = TrainConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_builds_a_deepspeed_config(recipe):
    cfg = load_config(recipe)
    ds = build_deepspeed_config(cfg, world_size=8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == cfg.data.micro_batch_rows * cfg.data.grad_accum_steps * 8


def test_recipe_sizes():
    assert len(RECIPES) >= 5
    sizes = {load_config(r).model.size for r in RECIPES}
    assert {"tiny", "125m", "350m", "1b", "7b"} <= sizes


def test_overrides_are_typed():
    cfg = load_config(
        REPO_ROOT / "recipes" / "tiny_cpu.yaml",
        ["optim.lr=1e-3", "jepa.predictor_tokens=3", "checkpoint.resume=false",
         "data.paths=[a,b]", "data.weights=[1,3]", "jepa.distance=infonce",
         "model.overrides={num_hidden_layers: 3}", "run_dir=x"],
    )  # fmt: skip
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.jepa.predictor_tokens == 3 and cfg.checkpoint.resume is False
    assert cfg.data.paths == ["a", "b"] and cfg.data.weights == [1.0, 3.0]
    assert cfg.jepa.distance == "infonce" and cfg.model.overrides == {"num_hidden_layers": 3}
    assert load_config(None, ["data.paths=one"]).data.paths == ["one"]
    # one key of a mapping field: typed, merged into the recipe's mapping
    nlrx = REPO_ROOT / "recipes" / "nlrx_cpu.yaml"
    merged = load_config(nlrx, ["model.overrides.hidden_size=128"]).model.overrides
    assert merged == {**load_config(nlrx, []).model.overrides, "hidden_size": 128}


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("nope=1", "unknown config key 'nope'"),
        ("optim.lr=fast", "optim.lr must be a float, got 'fast'"),
        ("data.micro_batch_rows=2.5", "data.micro_batch_rows must be an int"),
        ("checkpoint.resume=maybe", "checkpoint.resume must be a bool"),
        ("jepa.distance=l1", "jepa.distance must be one of ['cosine', 'l2', 'mse', 'infonce']"),
        ("optim=3", "optim is a section"),
        ("optim.lr", "not of the form dotted.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("jepa.predictor_tokens=-1", "jepa.predictor_tokens must be >= 0, got -1"),
        ("jepa.loss_dropout=1.5", "jepa.loss_dropout must be in [0, 1]"),
        ("schedule.warmup_steps=5000", "schedule.warmup_steps must be <= schedule.train_steps"),
        ("data.weights=[1]", "data.weights must be one weight per path"),
    ],
)
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_recipe_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config(bad)


def test_deepspeed_dict_is_filled_from_the_tree():
    cfg = load_config(REPO_ROOT / "recipes" / "tiny_cpu.yaml",
                      ["data.micro_batch_rows=3", "data.grad_accum_steps=4", "optim.lr=0.01"])  # fmt: skip
    ds = build_deepspeed_config(cfg, world_size=2)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (24, 3, 4)
    assert ds["optimizer"]["params"]["lr"] == 0.01
    assert ds["optimizer"]["params"]["torch_adam"] is True  # kept from ds_configs/zero3_cpu.json
    assert ds["gradient_clipping"] == cfg.optim.grad_clip_norm
    assert not ds.get("bf16", {}).get("enabled")


def test_global_batch_is_asserted():
    cfg = load_config(
        None, ["data.micro_batch_rows=2", "data.grad_accum_steps=2", "data.global_batch_rows=16"]
    )
    assert global_batch_rows(cfg, 4) == 16
    with pytest.raises(ValueError, match=r"data.global_batch_rows=16 but .* world size \(2\) = 8"):
        global_batch_rows(cfg, 2)


def test_schedules():
    cfg = load_config(None, ["optim.lr=1.0", "schedule.train_steps=100", "schedule.warmup_steps=10",
                             "schedule.min_lr_ratio=0.1"])  # fmt: skip
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    lrs = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    wsd = load_config(None, ["optim.lr=1.0", "schedule.kind=wsd", "schedule.train_steps=100",
                             "schedule.warmup_steps=10", "schedule.decay_steps=20", "schedule.min_lr_ratio=0"])  # fmt: skip
    assert [lr_at(wsd, s) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(wsd, 80) == pytest.approx(0.95) and lr_at(wsd, 89) == pytest.approx(0.5)
    assert lr_at(wsd, 99) == pytest.approx(0.0)


def test_loss_dropout_draws_are_seeded_and_at_rate_alpha():
    cfg = load_config(None, ["jepa.loss_dropout=0.75", "seed=3"])
    draws = [jepa_rows_at(cfg, s) for s in range(4000)]
    assert draws == [jepa_rows_at(cfg, s) for s in range(4000)]  # same on every rank, on resume
    assert abs(sum(draws) / len(draws) - 0.25) < 0.03
    assert all(jepa_rows_at(load_config(None, []), s) for s in range(100))
    assert not any(jepa_rows_at(load_config(None, ["jepa.objective=stp"]), s) for s in range(100))


def test_memory_estimate():
    n = 1_000_000_000
    bf16 = estimate_memory(n, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}, 8)
    assert bf16["params_gib"] == pytest.approx(2 * n / 8 / 2**30)
    assert bf16["optimizer_gib"] == pytest.approx(12 * n / 8 / 2**30)
    assert bf16["total_gpu_gib"] == pytest.approx(16 * n / 8 / 2**30)
    off = estimate_memory(n, {"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}, 8)  # fmt: skip
    assert off["optimizer_gib"] == 0 and off["params_gib"] == 0
    assert off["cpu_optimizer_gib"] == pytest.approx(bf16["optimizer_gib"])


def test_dry_run_prints_config_deepspeed_dict_and_memory():
    proc = subprocess.run(
        [sys.executable, "pretrain/main.py", "recipes/llama_7b.yaml", "optim.lr=1e-4",
         "--dry_run", "--world_size", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert '"lr": 0.0001' in out and '"train_micro_batch_size_per_gpu": 2' in out
    assert '"train_batch_size": 1024' in out  # 2 × 64 × 8
    n_params = int(re.search(r"# model: ([\d,]+) parameters", out).group(1).replace(",", ""))
    assert 6.5e9 < n_params < 7.0e9
    total = float(re.search(r"total_gpu_gib: ([\d.]+)", out).group(1))
    assert total == pytest.approx(16 * n_params / 8 / 2**30, rel=1e-3)
    assert not (REPO_ROOT / "runs" / "llama_7b").exists()  # nothing written


@pytest.mark.parametrize(
    "recipe_text,override,expected",
    [
        ("data:\n  paths: [a\n  x: : :\n", None, "not valid YAML: line 3, column 4"),
        (None, "deepspeed_config=ds_configs/missing.json", "deepspeed_config: ds_configs/missing.json not found"),
        (None, "data.micro_batch_rows=zero", "data.micro_batch_rows must be an int"),
        (None, "model.init_from=/no/such/model", "model.init_from=/no/such/model: not a Hugging "
         "Face checkpoint folder (no config.json)"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, recipe_text, override, expected):
    """Before: a YAML syntax error gave a 67-line traceback, a missing DeepSpeed config another."""
    recipe = REPO_ROOT / "recipes" / "tiny_cpu.yaml"
    if recipe_text is not None:
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(recipe_text)
    cmd = [sys.executable, str(REPO_ROOT / "pretrain" / "main.py"), str(recipe)]
    cmd += [override] if override else []
    proc = subprocess.run([*cmd, "--dry_run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert expected in lines[-1] and lines[-1].startswith("config error: "), proc.stderr
    assert "Traceback" not in proc.stderr
