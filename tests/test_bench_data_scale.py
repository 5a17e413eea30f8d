"""bench/data_scale.py --quick: a synthetic shard set the full checks accept, read by two ranks as
the trainer reads it; the measured fields are present and within the bounds the design promises
(descriptors bounded by the reader LRU, sized from the process's limits; memory not growing with
the data; the next epoch's order set up in constant time)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, run_module

pytestmark = pytest.mark.slow

MiB = 2**20


def test_quick_scale_bench_reports_bounded_descriptors_and_memory(tokenizer_dir, tmp_path):
    folder, out = tmp_path / "set", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "data_scale.py"), "--quick", "--dir", str(folder),
         "--tokenizer", str(tokenizer_dir), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "time to first batch" in proc.stdout and "projected to" in proc.stdout
    report = json.loads(out.read_text())
    assert (report["records"], report["shards"], report["world"]) == (10**6, 200, 2)

    # The synthetic set passes every check a user would run, the .bin sha256s included.
    verified = run_module("data_pipeline.verify", folder)
    assert verified.stdout.startswith(f"OK {folder}: 200 shards, 1000000 records")
    gen = report["generation"]
    assert 40 < gen["shard_bytes"] / 10**6 < 100  # ~24 tokens (uint16) + 20 index bytes each

    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    lru = report["max_open_readers"]  # shards.open_readers_limit() in rank 0
    assert lru >= 16 and all(r["open_readers_limit"] == lru for r in report["ranks"])
    for r in report["ranks"]:
        assert 0 < r["first_batch_s"] < 120
        for phase in ("cold", "warm", "unbounded"):
            assert r[phase]["steps"] == 12 and r[phase]["records"] > 0
            assert math.isfinite(r[phase]["micro_batches_per_s"]) and r[phase]["records_per_s"] > 0
        # 200 shards read in a random order: an LRU of L < 200 shards misses 1 - L/200 of the
        # reads (every shard opened once in the cold phase when L >= 200); descriptors stay
        # bounded by it (one per map), and follow the shards when it is lifted.
        assert r["warm"]["map_opens_per_record"] <= max(0.0, 1 - lru / 200) + 0.05
        assert r["warm"]["fds_max"] <= r["fds_base"] + 2 * min(lru, 200) + 8
        assert r["unbounded"]["fds_max"] >= r["fds_base"] + 2 * 200 - 8
        # Memory: the interpreter with torch (~250 MiB) plus what the dataset adds, which does not
        # depend on the records (the order is computed on demand).
        assert r["mem_warm"]["rss"] < 600 * MiB
        assert r["mem_warm"]["anon"] - r["mem_base"]["anon"] < 64 * MiB
        assert 0 < r["mem_warm"]["uss"] <= r["mem_warm"]["pss"] <= r["mem_warm"]["rss"]
        roll = r["rollover"]
        assert roll["boundary_records"] > 0 and roll["order_setup_s"] < 1.0
    assert report["order_at_scale"]["setup_s"] < 1.0  # 10⁹ records, 1,000 ranks
    proj = report["projection"]
    assert proj["fds_per_rank_max"] <= report["ranks"][0]["fds_base"] + 2 * lru + 8
    assert proj["records"] == 10**9 and proj["disk_bytes"] > 40 * 10**9
