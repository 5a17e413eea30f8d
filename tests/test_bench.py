"""The benchmarks run end to end on tiny settings and print their ratios (not their size)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

from engine_fixtures import REPO, engine_env


def test_engine_overhead_prints_finite_ratios(bundled_shards):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "engine_overhead.py"), str(bundled_shards),
         "--steps", "2", "--warmup", "1", "--seq_len", "128", "--micro_batch_rows", "2"],
        cwd=REPO, env=engine_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("engine/bare step time", "data wait share, LM-only", "data wait share, JEPA k=1"):
        found = re.search(rf"^{re.escape(name)}:\s+(\S+)$", proc.stdout, re.M)
        assert found, f"no {name!r} line in:\n{proc.stdout}"
        value = float(found.group(1))
        assert math.isfinite(value) and value > 0, f"{name}: {value}"


def test_loss_memory_prints_finite_ratios_and_equal_losses():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "loss_memory.py"), "--quick"],
        cwd=REPO, env=engine_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for vocab in (1000, 4000):
        for name in ("peak memory new/full", "time new/full", "loss rel. diff new vs full"):
            line = f"{name}, vocab {vocab}"
            found = re.search(rf"^{re.escape(line)}:\s+(\S+)$", proc.stdout, re.M)
            assert found, f"no {line!r} line in:\n{proc.stdout}"
            value = float(found.group(1))
            assert math.isfinite(value), f"{line}: {value}"
            if name == "loss rel. diff new vs full":
                assert value < 1e-5, f"{line}: {value}"  # the two paths compute the same loss
            else:
                assert value > 0, f"{line}: {value}"


def test_gpu_check_quick_cpu_reports_both_modes_and_parity(tmp_path):
    import json

    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--quick", "--device", "cpu",
         "--out", str(out)],
        cwd=REPO, env=engine_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("device", "versions", "date", "settings", "cases", "ratios", "parity"):
        assert key in report, key
    cases = {c["mode"]: c for c in report["cases"]}
    assert set(cases) == {"lm", "jepa"}, report["cases"]
    for mode, case in cases.items():
        assert case["status"] == "ok", case
        assert math.isfinite(case["tokens_per_s"]) and case["tokens_per_s"] > 0, (mode, case)
        assert case["mfu"] is None  # no MFU on a CPU
    assert cases["jepa"]["rows_with_jepa"] and not cases["lm"]["rows_with_jepa"]
    ratio = report["ratios"]["tiny"]
    assert math.isfinite(ratio["time_per_lm_token"]) and ratio["time_per_lm_token"] > 0, ratio
    assert ratio["step_time"] > 0, ratio
    parity = report["parity"]
    assert parity["status"] == "ok" and parity["pass"] is True, parity
    assert parity["rel_l2_diff"] <= 1e-2, parity
