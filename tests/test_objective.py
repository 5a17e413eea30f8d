"""The objective module: the chunked LM head equals the full-logits path (alone, and under real
2-process ZeRO-3), gradient accumulation in fp32, the bf16 path on CPU, the optimizer settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import BIN, REPO, engine_env, free_port, launch, read_metrics, tiny_overrides

from pretrain.config import JepaConfig, ModelConfig, build_deepspeed_config, load_config
from pretrain.loss import default_chunk_tokens, linear_cross_entropy_sum, lm_loss_sum
from pretrain.model import build_model, build_model_config
from pretrain.objective import Objective, add_label_index

# ---------------------------------------------------------------------------------------------
# The chunked linear cross-entropy, a pure function


def _full(h, w, y, b=None):
    return lm_loss_sum(F.linear(h, w, b)[None], y[None])[0]


@pytest.mark.parametrize("chunk", [1, 5, 16, 0])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_equals_full_logits_in_value_and_gradients(chunk, bias):
    torch.manual_seed(chunk)
    h = torch.randn(16, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    y = torch.randint(0, 40, (16,))
    leaves = [t for t in (h, w, b) if t is not None]
    got = linear_cross_entropy_sum(h, w, y, b, chunk_tokens=chunk)
    g_got = torch.autograd.grad(got * 3.0, leaves)  # a scale on the output reaches every grad
    want = _full(h, w, y, b)
    g_want = torch.autograd.grad(want * 3.0, leaves)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    for g, e in zip(g_got, g_want):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_bf16_is_as_close_as_the_full_path():
    """bf16 weights: logits are computed in bf16 then fp32 on both paths; gradients go back
    through bf16 matmuls. The bound: 2 bf16 ulps of the largest gradient entry."""
    torch.manual_seed(0)
    h = torch.randn(24, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 16, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 64, (24,))
    got = linear_cross_entropy_sum(h, w, y, chunk_tokens=5)
    g_got = torch.autograd.grad(got, [h, w])
    want = _full(h, w, y)
    g_want = torch.autograd.grad(want, [h, w])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)
    for g, e in zip(g_got, g_want):
        assert g.dtype == torch.bfloat16
        assert float((g.float() - e.float()).abs().max()) <= 2 * 2**-8 * float(e.abs().max())


def test_chunked_cross_entropy_without_labels_and_without_grad():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    zero = linear_cross_entropy_sum(h, w, torch.zeros(0, dtype=torch.long))
    assert float(zero.detach()) == 0.0
    zero.backward()  # still in the graph: every rank runs the same backward
    assert float(w.grad.abs().sum()) == 0.0
    with torch.no_grad():
        y = torch.randint(0, 40, (5,))
        h2 = torch.randn(5, 8)
        torch.testing.assert_close(
            linear_cross_entropy_sum(h2, w, y, chunk_tokens=2), _full(h2, w, y)
        )


def test_default_chunk_bounds_the_logits_per_chunk():
    assert default_chunk_tokens(128_256) * 128_256 <= 2**26
    assert default_chunk_tokens(32_000) == 2**26 // 32_000
    assert default_chunk_tokens(10) == 8192 and default_chunk_tokens(10**9) == 64


# ---------------------------------------------------------------------------------------------
# The module, one process


def _packed_batch(k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from data_pipeline.packing import PackingConfig, SpecialIds, collate_rows, pack_rows

    rng = np.random.default_rng(seed)
    records = [[rng.integers(8, 100, rng.integers(2, 10)) for _ in range(2)] for _ in range(12)]
    specials = SpecialIds(bos=1, eos=2, pad=0, view_sep=3, predictors=(4, 5, 6))
    rows, _ = pack_rows(records, PackingConfig(64, specials, predictor_tokens=k))
    host = add_label_index(collate_rows(rows))
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in host.items()}


@pytest.mark.parametrize("hidden_layer", [-1, 1])
def test_objective_chunked_equals_full_with_any_jepa_layer(hidden_layer):
    config = build_model_config("llama", "tiny", vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    model = build_model(config).eval()
    jepa = JepaConfig(predictor_tokens=2, hidden_layer=hidden_layer)
    batch = _packed_batch(2)
    res = {}
    for impl in ("full", "chunked"):
        obj = Objective(model, jepa, ModelConfig(lm_loss=impl, lm_loss_chunk_tokens=9))
        model.zero_grad()
        out = obj(batch, with_jepa=True)
        (out.lm_sum / 100 + out.aux_sum).backward()
        res[impl] = (out, [p.grad.clone() for p in model.parameters()])
    (full, g_full), (chunked, g_chunked) = res["full"], res["chunked"]
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    assert float(full.aux_sum.detach()) > 0 and float(full.cos_sum) != 0
    for a, b in zip(g_full, g_chunked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # without label_index (computed on the device instead) the result is the same
    plain = {k: v for k, v in batch.items() if k not in ("label_index", "label_targets")}
    with torch.no_grad():
        again = Objective(model, jepa, ModelConfig())(plain, with_jepa=True)
    torch.testing.assert_close(again.lm_sum, chunked.lm_sum, atol=1e-5, rtol=1e-6)


def test_objective_refuses_logit_postprocessing_in_chunked_mode():
    config = build_model_config("llama", "tiny", vocab_size=100, max_position_embeddings=64)
    model = build_model(config)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping.*model.lm_loss=full"):
        Objective(model, JepaConfig(), ModelConfig(lm_loss="chunked"))
    Objective(model, JepaConfig(), ModelConfig(lm_loss="full"))  # the full path applies it


# ---------------------------------------------------------------------------------------------
# Under DeepSpeed ZeRO-3, 2 processes


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory):
    import subprocess

    out = tmp_path_factory.mktemp("zero3") / "results.json"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "zero3_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=engine_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["llama/none/k1", "llama/jepa/k0", "llama/jepa/k1", "llama/jepa/k3", "llama/stp/k1",
             "gpt2/jepa/k1", "llama/jepa/k1/sigreg", "llama/jepa/k1/vicreg"],
)  # fmt: skip
def test_zero3_chunked_head_equals_full_logits(zero3_results, case):
    """Engine (chunked head, ZeRO-3 partitions, each rank its own batch) against the full-logits
    reference over both batches in one process: loss and every parameter's gradient to 1e-5.
    gpt2 ties its LM head to the input embedding."""
    r = zero3_results["grads"][case]
    assert r["n_params"] >= 21
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * max(1.0, abs(r["ref_loss"])), r
    assert r["max_grad_diff"] <= 1e-5, r
    assert r["grad_scale"] > 1e-3  # the gradients compared are not all ~0


@pytest.mark.slow
def test_zero3_accumulation_one_batch_of_n_rows_equals_n_micro_batches(zero3_results):
    """Gradient after the accumulation boundary: 1 micro-batch of 4 rows vs 4 micro-batches of
    1 row. fp32: 1e-6. bf16 (compute in bf16, accumulation and reduction in fp32): the relative
    L2 difference is bf16 rounding of the per-micro-batch gradients, documented bound 1e-2."""
    fp32, bf16 = zero3_results["accum"]["fp32"], zero3_results["accum"]["bf16"]
    assert fp32["max_abs_diff"] <= 1e-6, fp32
    assert bf16["accum_dtype"] == fp32["accum_dtype"] == "torch.float32"
    assert bf16["rel_l2_diff"] <= 1e-2, bf16
    assert bf16["grad_max"] > 0.1


# ---------------------------------------------------------------------------------------------
# Precision and optimizer settings


def test_deepspeed_config_uses_torch_adamw_and_fp32_accumulation_for_every_gpu_recipe():
    for recipe in sorted((REPO / "recipes").glob("llama_*.yaml")):
        ds = build_deepspeed_config(load_config(recipe), world_size=8)
        assert ds["optimizer"]["params"]["torch_adam"] is True, recipe
        assert ds["bf16"]["enabled"] is True, recipe
        assert ds["data_types"]["grad_accum_dtype"] == "fp32", recipe
        assert ds["communication_data_type"] == "fp32", recipe
    cpu = build_deepspeed_config(load_config(REPO / "recipes" / "tiny_cpu.yaml"), world_size=2)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "data_types" not in cpu
    fused = load_config(REPO / "recipes" / "llama_1b.yaml", ["optim.implementation=torch_fused"])
    assert build_deepspeed_config(fused, 8)["optimizer"]["params"]["fused"] is True
    own = load_config(REPO / "recipes" / "llama_1b.yaml", ["optim.implementation=deepspeed"])
    assert "torch_adam" not in build_deepspeed_config(own, 8)["optimizer"]["params"]


def test_dry_run_shows_fp32_accumulation_and_warns_about_dense_masks_on_long_rows():
    import subprocess
    import sys

    base = [sys.executable, str(REPO / "pretrain" / "main.py"), str(REPO / "recipes" / "llama_1b.yaml"),
            "--dry_run", "--world_size", "8"]  # fmt: skip
    proc = subprocess.run(
        base, cwd=REPO, env=engine_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert '"grad_accum_dtype": "fp32"' in proc.stdout and '"torch_adam": true' in proc.stdout
    assert "WARNING" not in proc.stdout  # flex_attention
    proc = subprocess.run([*base, "model.attn_implementation=sdpa"], cwd=REPO, env=engine_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "# WARNING: model.attn_implementation=sdpa with data.seq_len_tokens=4096" in proc.stdout


@pytest.mark.slow
def test_bf16_zero3_trains_on_cpu(bundled_shards, tmp_path):
    """DeepSpeed bf16 + ZeRO-3 over gloo through the real entry point: finite losses that fall,
    fp32 accumulation in the resolved DeepSpeed config."""
    run_dir = tmp_path / "bf16"
    launch(tiny_overrides(bundled_shards, run_dir, **{
        "deepspeed_config": "ds_configs/zero3_bf16.json", "schedule.train_steps": 10,
        "data.grad_accum_steps": 2, "logging.eval_every_steps": 0,
    }))  # fmt: skip
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(10))
    assert all(math.isfinite(r["loss/total"]) for r in rows)
    assert rows[-1]["loss/lm"] < rows[0]["loss/lm"] - 0.5
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
