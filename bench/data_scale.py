"""The data pipeline at pretraining scale: a synthetic shard set of N short two-view records, read
by a world of ranks exactly as the trainer reads it.

    python bench/data_scale.py [--records 100000000] [--shards 2000] [--ranks 2] [--quick]
                               [--dir DIR] [--tokenizer DIR] [--json PATH]

1. Writes N records over S shards straight in the shard format (format-2 .idx: offsets, view
   lengths, CRC32s, largest id) with a manifest.json the start-up checks accept (totals, sha256 of
   every .bin and .idx, tokenizer folder and hash). Vectorised: each record is drawn from a pool
   of 65,536 distinct random records (view lengths 4..28 and 2..14 tokens, as the bundled NL-RX
   corpus), whose CRC32s are computed once; a shard is then a gather. Prints the disk it takes.
   Its page cache is dropped (fdatasync + POSIX_FADV_DONTNEED, these files only) unless --warm.
2. Starts W rank processes over gloo. Each runs what pretrain/trainer.py runs: its share of the
   start-up checks (`check_data_once`, every W-th shard), `_dataset(cfg, "train", seed)`
   (PackedDataset, best-fit packing) and `StepInputs` (the prefetch thread), and measures: time
   to the first batch; micro-batches/s cold (first steps), warm, and warm with the shard LRU
   unbounded (`shards.MAX_OPEN_READERS` ≥ S: what the LRU's open/close of maps costs, when
   `shards.open_readers_limit()`, sized from the process's limits, is below S); memory (RSS, PSS,
   USS, anonymous from /proc/self/smaps_rollup); open descriptors (/proc/self/fd); bytes read from
   disk and major faults per record; shard maps opened per record; an epoch rollover (the dataset
   resumed a few steps before the end of its part of epoch 0, steps timed across the boundary).
3. Times the on-demand order at 10⁹ records and 1,000 ranks directly (no data needed), prints a
   table, and projects to 10⁹ records / 1,000 ranks with the formula (what scales with records,
   shards, ranks).

`--quick`: 10⁶ records over 200 shards, fewer steps (tests/test_bench_data_scale.py runs it).
The generated set is deleted at the end unless --dir names where to keep it (an existing set of
the same size there is reused). Numbers go to docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from data_pipeline import shards as shard_io  # noqa: E402

BUNDLED = REPO / "data" / "nlrx_synth" / "train.jsonl"
POOL_RECORDS = 1 << 16
VIEW_LENGTHS = ((4, 28), (2, 14))  # tokens per view, inclusive ranges
PROJECT_RECORDS, PROJECT_RANKS = 10**9, 1000
MiB = 2**20

# ---------------------------------------------------------------------------------------------
# 1. The synthetic shard set

_POOL: dict = {}  # the record pool, inherited by the forked writer processes


def make_pool(vocab_size: int, first_id: int, seed: int = 0) -> dict:
    """POOL_RECORDS distinct two-view records: their tokens back to back, starts, view lengths,
    CRC32s (zlib, all views' bytes as stored) and largest ids."""
    rng = np.random.default_rng(seed)
    lengths = np.stack([rng.integers(lo, hi + 1, POOL_RECORDS) for lo, hi in VIEW_LENGTHS], 1)
    sizes = lengths.sum(1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    tokens = rng.integers(first_id, vocab_size, int(sizes.sum())).astype("<u2")
    crcs = np.array([zlib.crc32(tokens[s : s + n]) for s, n in zip(starts, sizes)], dtype="<u4")
    maxes = np.maximum.reduceat(tokens, starts)
    return {"tokens": tokens, "starts": starts, "sizes": sizes, "lengths": lengths.astype("<u4"),
            "crcs": crcs, "maxes": maxes}  # fmt: skip


def write_shard(job: tuple[Path, str, int, int]) -> dict:
    """One shard of `n` records drawn from the pool (seeded by its index); its manifest entry."""
    prefix, name, n, seed = job
    pool = _POOL
    pick = np.random.default_rng([seed, 1]).integers(0, POOL_RECORDS, n)
    sizes = pool["sizes"][pick]
    ends = np.cumsum(sizes)
    offsets = (ends - sizes).astype("<u8")
    # token t of the shard is pool token (pool start of its record) + (t - its record's offset)
    gather = np.repeat(pool["starts"][pick] - offsets.astype(np.int64), sizes)
    gather += np.arange(int(ends[-1]) if n else 0)
    tokens = pool["tokens"][gather]
    lengths = pool["lengths"][pick]
    max_id = int(pool["maxes"][pick].max()) if n else 0
    c = shard_io._HEADER  # the format's own header struct (data_pipeline/README.md)
    code = shard_io.dtype_code(tokens.dtype)
    bin_bytes = c.pack(shard_io.BIN_MAGIC, shard_io.BIN_VERSION, code, tokens.size, 0)
    bin_bytes += tokens.tobytes()
    idx_bytes = c.pack(shard_io.IDX_MAGIC, shard_io.IDX_VERSION, 2, n, tokens.size)
    idx_bytes += shard_io._MAX_ID.pack(max_id)
    idx_bytes += offsets.tobytes() + lengths.tobytes() + pool["crcs"][pick].tobytes()
    for ext, data in (("bin", bin_bytes), ("idx", idx_bytes)):
        Path(f"{prefix}.{ext}").write_bytes(data)
    view_tokens = [int(lengths[:, j].sum(dtype=np.int64)) for j in range(2)]
    return {
        "name": name, "split": "train", "records": n, "tokens": int(tokens.size),
        "view_tokens": view_tokens, "bin_bytes": len(bin_bytes), "idx_bytes": len(idx_bytes),
        "bin_sha256": hashlib.sha256(bin_bytes).hexdigest(),
        "idx_sha256": hashlib.sha256(idx_bytes).hexdigest(),
        "unit": {"path": "synthetic", "kind": "synthetic", "start": seed, "end": seed + 1,
                 "first_line": 1},
    }  # fmt: skip


def prepare_tokenizer(folder: Path, source: Path | None) -> tuple[str, int, dict]:
    """folder/tokenizer (copied from source, or trained on the bundled corpus): hash, vocab
    size, special ids."""
    from data_pipeline.tokenizer import (
        load_tokenizer,
        special_token_ids,
        tokenizer_hash,
        train_tokenizer,
    )

    dst = folder / "tokenizer"
    if not (dst / "tokenizer.json").exists():
        if source is not None:
            shutil.copytree(source, dst)
        else:
            from data_pipeline.sources import iter_view_texts

            train_tokenizer(iter_view_texts(str(BUNDLED), "messages"), dst, vocab_size=1000)
    tok = load_tokenizer(dst)
    return tokenizer_hash(dst), len(tok), special_token_ids(tok)


def build_manifest(tok_hash: str, vocab: int, specials: dict, entries: list[dict]) -> dict:
    """A manifest as data_pipeline.preprocess writes it (data_pipeline/README.md, "Manifest")."""
    from data_pipeline.preprocess import SKIP_REASONS

    n = sum(s["records"] for s in entries)
    train = {"records": n, "tokens": sum(s["tokens"] for s in entries),
             "view_tokens": [sum(s["view_tokens"][j] for s in entries) for j in range(2)]}  # fmt: skip
    settings = {
        "views": {"mode": "messages", "names": ["user", "assistant"], "system_prompt": "drop"},
        "tokenizer_hash": tok_hash, "vocab_size": vocab, "dtype": "<u2",
        "max_record_tokens": 1024, "val_fraction": 0.0, "shard_bytes": 0,
        "lm_views": [0, 1], "lm_loss_views": [0, 1],
    }  # fmt: skip
    return {
        "schema_version": 1,
        "tokenizer": {"hash": tok_hash, "vocab_size": vocab, "dir": "tokenizer",
                      "special_ids": specials},  # fmt: skip
        "settings": settings, "inputs": [], "input_records": n, "written_records": n,
        "skipped": dict.fromkeys(SKIP_REASONS, 0), "skip_examples": [],
        "splits": {"train": train, "val": {"records": 0, "tokens": 0, "view_tokens": [0, 0]}},
        "shards": entries,
    }  # fmt: skip


def generate(folder: Path, n_records: int, n_shards: int, tokenizer: Path | None,
             workers: int) -> dict:  # fmt: skip
    """Writes the shard set (or reuses one of the same size in folder); returns its facts."""
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        if m["written_records"] == n_records and len(m["shards"]) == n_shards:
            return {"generate_s": None, "reused": True, **disk_usage(folder)}
        raise SystemExit(f"{folder} holds another shard set: remove it or choose another --dir")
    t0 = time.perf_counter()
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    tok_hash, vocab, specials = prepare_tokenizer(folder, tokenizer)
    if vocab > 2**16:
        raise SystemExit(f"the bench writes uint16 shards; tokenizer vocabulary {vocab} > 65536")
    _POOL.update(make_pool(vocab, first_id=max_special(specials) + 1))
    per, extra = divmod(n_records, n_shards)
    jobs = [(folder / "shards" / f"{i:05d}.train", f"{i:05d}.train", per + (i < extra), i)
            for i in range(n_shards)]  # fmt: skip
    with get_context("fork").Pool(workers) as pool:
        entries = pool.map(write_shard, jobs, chunksize=max(1, n_shards // (8 * workers)))
    manifest = build_manifest(tok_hash, vocab, specials, entries)
    shard_io.write_atomic(
        manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    )
    return {"generate_s": time.perf_counter() - t0, "reused": False, **disk_usage(folder)}


def max_special(specials: dict) -> int:
    return max([v for k, v in specials.items() if k != "predictors"] + specials["predictors"])


def disk_usage(folder: Path) -> dict:
    """Apparent bytes and allocated bytes (st_blocks) of everything under folder."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    shards = sum(s.st_size for f, s in zip(files, stats) if f.parent.name == "shards")
    return {"disk_bytes": sum(s.st_size for s in stats), "shard_bytes": shards,
            "disk_allocated_bytes": sum(s.st_blocks * 512 for s in stats),
            "manifest_bytes": (folder / "manifest.json").stat().st_size}  # fmt: skip


def drop_page_cache(folder: Path) -> float:
    """Writes back and evicts this set's pages (only its files), so ranks start cold."""
    t0 = time.perf_counter()
    for p in (folder / "shards").iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# 2. One rank, as the trainer runs it


def memory() -> dict:
    """This process's memory in bytes: RSS, PSS, USS (private clean + dirty), anonymous."""
    kb = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        kb[key] = int(value.split()[0])
    return {"rss": kb["Rss"] * 1024, "pss": kb["Pss"] * 1024,
            "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024,
            "anon": kb["Anonymous"] * 1024}  # fmt: skip


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def io_counters() -> tuple[int, int]:
    """(bytes this process caused to be read from storage, major page faults)."""
    read = next(int(line.split()[1]) for line in Path("/proc/self/io").read_text().splitlines()
                if line.startswith("read_bytes"))  # fmt: skip
    return read, resource.getrusage(resource.RUSAGE_SELF).ru_majflt


class MapCounter:
    """Counts shard maps opened (ShardReader._map_files calls): a miss of the reader LRU."""

    def __init__(self):
        self.opens = 0
        original = shard_io.ShardReader._map_files

        def counted(reader):
            self.opens += 1
            return original(reader)

        shard_io.ShardReader._map_files = counted


def run_phase(ds, cfg, start_step: int, steps: int, maps: MapCounter) -> dict:
    """`steps` steps through StepInputs (the trainer's prefetch thread), sampling descriptors and
    RSS every step."""
    from pretrain.batches import StepInputs

    records0, opens0, (read0, faults0) = ds.stats.records, maps.opens, io_counters()
    fds, rss, first = [], [], None
    t0 = time.perf_counter()
    inputs = StepInputs(ds, cfg, start_step)
    try:
        for _ in range(steps):
            inputs.next()
            first = first or time.perf_counter() - t0
            fds.append(open_fds())
            rss.append(rss_bytes())
        elapsed = time.perf_counter() - t0
    finally:
        inputs.close()
    # the prefetch thread may have packed one step more than handed out: per-record counts use
    # the dataset's own counter, rates the steps handed out
    records = ds.stats.records - records0
    read, faults = io_counters()
    return {"steps": steps, "seconds": elapsed, "first_step_s": first,
            "micro_batches_per_s": steps * cfg.data.grad_accum_steps / elapsed,
            "records_per_s": records / elapsed, "records": records,
            "map_opens_per_record": (maps.opens - opens0) / max(records, 1),
            "read_bytes_per_record": (read - read0) / max(records, 1),
            "major_faults_per_record": (faults - faults0) / max(records, 1),
            "fds_max": max(fds), "rss_max": max(rss)}  # fmt: skip


def measure_rollover(ds, cfg, steps_before: int, records_per_step: float) -> dict:
    """Resumes every rank a few steps before the end of its part of epoch 0 (the dataset's own
    load_state_dict) and times steps, on the caller's thread, across the epoch boundary."""
    from data_pipeline.dataset import STATE_VERSION
    from data_pipeline.order import RankPart
    from pretrain.batches import build_step_input

    n, w = int(ds.offsets[-1]), ds.world_size
    before = int(steps_before * records_per_step)
    ranks = []
    for r in range(w):
        part_len = -(-(n - r) // w)
        ranks.append({"epoch": 0, "layers": [], "cursor": max(0, part_len - before),
                      "part_len": part_len, "rows": [], "rows_mode": None, "carry": []})  # fmt: skip
    ds.load_state_dict({"version": STATE_VERSION, "seed": ds.seed, "manifest_hash":
                        ds.manifest_hash, "world_size": w, "ranks": ranks})  # fmt: skip
    # Steps alternate between packing a window (16 rows' worth of records read) and handing out
    # rows already packed, so steps are compared by their time per record read.
    times, reads, boundary = [], [], None
    for step in range(2 * steps_before):
        t0, r0 = time.perf_counter(), ds.stats.records
        build_step_input(ds, cfg, step, True, pin=False)
        times.append(time.perf_counter() - t0)
        reads.append(ds.stats.records - r0)
        if boundary is None and ds.epoch == 1:
            boundary = step
    if boundary is None:
        raise RuntimeError("the rollover measurement did not reach epoch 1")
    other_s, other_n = sum(times) - times[boundary], sum(reads) - reads[boundary]
    t0 = time.perf_counter()
    part = RankPart(ds.order(2), [], ds.rank, w)
    part[0]  # the first block of 4096 ids
    return {"boundary_step_s": times[boundary], "boundary_records": reads[boundary],
            "boundary_s_per_record": times[boundary] / max(reads[boundary], 1),
            "other_s_per_record": other_s / max(other_n, 1), "max_other_step_s":
            max(times[:boundary] + times[boundary + 1 :]),
            "order_setup_s": time.perf_counter() - t0, "boundary_step": boundary}  # fmt: skip


def run_rank(args) -> dict:
    """One rank of the world (RANK / WORLD_SIZE / MASTER_* set by the parent)."""
    import torch.distributed as dist

    from pretrain import trainer
    from pretrain.config import load_config

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, [f"data.paths=[{args.rank_of}]",
                             f"data.seq_len_tokens={args.seq_len}",
                             f"data.micro_batch_rows={args.micro_batch_rows}"])  # fmt: skip
    maps = MapCounter()
    out = {"rank": rank, "mem_base": memory(), "fds_base": open_fds()}
    dist.barrier()
    t0 = time.perf_counter()
    trainer.check_data_once(cfg)  # each rank checks its share; all get the same verdict
    out["verify_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    ds = trainer._dataset(cfg, "train", cfg.seed)  # exactly how the trainer builds it per rank
    out["build_s"] = time.perf_counter() - t1
    out["mem_built"] = memory()
    out["cold"] = run_phase(ds, cfg, 0, args.steps, maps)  # its first step: the first batch
    out["first_batch_s"] = out["verify_s"] + out["build_s"] + out["cold"]["first_step_s"]
    out["warm"] = run_phase(ds, cfg, args.steps, args.steps, maps)
    out["mem_warm"] = memory()
    out["open_readers_limit"] = shard_io.open_readers_limit()  # from this process's limits
    limit = shard_io.MAX_OPEN_READERS
    shard_io.MAX_OPEN_READERS = len(ds.sources[0].readers) + 1
    out["unbounded"] = run_phase(ds, cfg, 2 * args.steps, args.steps, maps)
    out["mem_unbounded"] = memory()
    shard_io.MAX_OPEN_READERS = limit
    rps = out["warm"]["records"] / out["warm"]["steps"]
    out["rollover"] = measure_rollover(ds, cfg, args.rollover_steps, rps)
    out["open_readers_end"] = shard_io.open_readers()
    dist.barrier()
    dist.destroy_process_group()
    return out


# ---------------------------------------------------------------------------------------------
# 3. The world, the order at 10⁹, the report


def launch_ranks(folder: Path, args) -> list[dict]:
    from pretrain.distributed import _free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(args.ranks), "PYTHONPATH": str(REPO)}  # fmt: skip
    procs, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.ranks):
            cmd = [sys.executable, __file__, "--rank_of", str(folder), "--result",
                   f"{tmp}/{r}.json", "--steps", str(args.steps), "--rollover_steps",
                   str(args.rollover_steps), "--seq_len", str(args.seq_len),
                   "--micro_batch_rows", str(args.micro_batch_rows)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
        while any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs):  # one failed: the others would wait for it forever
                for other in procs:
                    if other.poll() is None:
                        other.kill()
            time.sleep(0.2)
        codes = [p.returncode for p in procs]
        if any(codes):
            raise SystemExit(f"rank processes exited {codes}")
        for r in range(args.ranks):
            results.append(json.loads(Path(f"{tmp}/{r}.json").read_text()))
    return results


def order_at_scale(n: int = PROJECT_RECORDS, world: int = PROJECT_RANKS) -> dict:
    """The epoch order of n records split over `world` ranks, computed as a rank does at an epoch
    start (EpochOrder + RankPart + its first block of ids), and its steady cost per id."""
    from data_pipeline.order import EpochOrder, RankPart

    t0 = time.perf_counter()
    part = RankPart(EpochOrder([n], [n], [0], seed=0, epoch=1, shuffle=True), [], world - 1, world)
    part[0]
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = part.ids(4096, 4096 * 17)
    per_id = (time.perf_counter() - t0) / ids.size
    return {"records": n, "ranks": world, "setup_s": setup, "per_id_s": per_id}


def project(report: dict, n_new: int = PROJECT_RECORDS, w_new: int = PROJECT_RANKS) -> dict:
    """Each measured quantity scaled by what it depends on; shards keep their size (records per
    shard), so S' = S · N'/N. Rank 0's numbers (the one that verifies) unless said."""
    n, s = report["records"], report["shards"]
    s_new = s * n_new // n
    r0, gen = report["ranks"][0], report["generation"]
    lru = report["max_open_readers"]
    anon_dataset = r0["mem_built"]["anon"] - r0["mem_base"]["anon"]
    # every .idx read and hashed once, shared among the ranks: ∝ records / ranks
    verify = r0["verify_s"] * n_new / n * report["world"] / w_new
    # the manifest parsed, no shard opened: ∝ shards. The fastest rank's time: every rank does
    # the same work, the slower ones were descheduled by the others' packing.
    build = min(r["build_s"] for r in report["ranks"]) * s_new / s
    return {
        "records": n_new, "ranks": w_new, "shards": s_new,
        "disk_bytes": gen["shard_bytes"] * n_new / n + gen["manifest_bytes"] * s_new / s,
        "verify_once_s": verify, "build_per_rank_s": build,
        "first_batch_s": verify + build + r0["cold"]["first_step_s"],
        "anon_per_rank_bytes": r0["mem_base"]["anon"] + anon_dataset * s_new / s,
        "fds_per_rank_max": r0["warm"]["fds_max"] + 2 * (lru - min(lru, s)),  # LRU full
        "records_per_s_per_rank": r0["warm"]["records_per_s"],
        "records_per_s_cluster": r0["warm"]["records_per_s"] * w_new,
        "map_opens_per_record": max(0.0, 1 - lru / s_new),
        "rollover_s": report["order_at_scale"]["setup_s"],
        # strace at 2,000 shards: the checks ~14 per shard (once in all), the build 0 per shard
        "metadata_calls_at_start": s_new * 14 + w_new * 4,
    }  # fmt: skip


FORMULA = """\
projection (N records, S shards of N/S records each, W ranks; measured values at the run's N, S):
  disk              = N · (shard bytes / record) + S · (manifest bytes / shard)
  verify (shared)   = before any rank builds, each rank reads + sha256s every W-th .idx
                      (20 B/record) with one check_index pass  → ∝ N / W (done once in all)
  build (per rank)  = manifest parse (counts from it; a shard's headers are checked when its
                      maps first open)                          → ∝ S, per rank;
                      metadata calls at start: ~14 per shard in the checks (once) + ~4 per
                      rank (the manifest), not W · S · 7 (every rank reading every header)
  first batch       = verify + build + first step (packing ~ one window)  → ∝ N + S
  anon memory/rank  = base + (dataset's anonymous bytes at S) · S'/S       → ∝ S, not N, not W
  fds/rank          ≤ base + 2 · L (one per map: .bin, .idx), L = the reader LRU's bound
                      (shards.open_readers_limit(): from RLIMIT_NOFILE and vm.max_map_count)
  records/s/rank    = measured (order on demand, O(1) per id)           → constant; cluster ∝ W
  shard maps opened / record = max(0, 1 − L / S) (random order over S shards)
  epoch rollover    = EpochOrder + RankPart + first 4,096 ids, measured at 10⁹ records, 1,000 ranks"""


def _mib(b: float) -> str:
    return f"{b / MiB:,.1f}"


def print_generation(args, gen: dict) -> None:
    how = "reused" if gen["reused"] else f"written in {gen['generate_s']:.1f} s"
    print(f"shard set: {args.records:,} records over {args.shards:,} shards, {how}; "
          f"disk {gen['disk_bytes'] / 2**30:.2f} GiB ({gen['shard_bytes'] / args.records:.1f} "
          f"B/record in shards, manifest {_mib(gen['manifest_bytes'])} MiB, allocated "
          f"{gen['disk_allocated_bytes'] / 2**30:.2f} GiB)", flush=True)  # fmt: skip
    if gen["drop_cache_s"] is not None:
        print(f"page cache of the set dropped in {gen['drop_cache_s']:.1f} s", flush=True)


def map_open_us(r: dict) -> float:
    """What the reader LRU costs per map it opens: the per-record time difference between the
    LRU and the unbounded phase, over the maps opened per record (nan: the LRU missed no read)."""
    extra = 1 / r["warm"]["records_per_s"] - 1 / r["unbounded"]["records_per_s"]
    opens = r["warm"]["map_opens_per_record"]
    return 1e6 * extra / opens if opens > 1e-3 else float("nan")


def report_rows(report: dict) -> list[tuple[str, list[str]]]:
    ranks = report["ranks"]

    def col(fn) -> list[str]:
        return [fn(r) for r in ranks]

    steps = ranks[0]["cold"]["steps"]
    return [
        ("start-up checks s (shared by the ranks)", col(lambda r: f"{r['verify_s']:.2f}")),
        ("dataset build s", col(lambda r: f"{r['build_s']:.2f}")),
        ("time to first batch s", col(lambda r: f"{r['first_batch_s']:.2f}")),
        (f"micro-batches/s, cold (first {steps} steps)",
         col(lambda r: f"{r['cold']['micro_batches_per_s']:.1f}")),
        ("micro-batches/s, warm", col(lambda r: f"{r['warm']['micro_batches_per_s']:.1f}")),
        ("micro-batches/s, warm, LRU unbounded",
         col(lambda r: f"{r['unbounded']['micro_batches_per_s']:.1f}")),
        ("records/s, warm", col(lambda r: f"{r['warm']['records_per_s']:,.0f}")),
        ("shard maps opened / record, warm (LRU)",
         col(lambda r: f"{r['warm']['map_opens_per_record']:.3f}")),
        ("µs / record: warm (LRU) / unbounded",
         col(lambda r: f"{1e6 / r['warm']['records_per_s']:.0f} / "
                       f"{1e6 / r['unbounded']['records_per_s']:.0f}")),
        ("µs per shard map opened (difference / opens)", col(lambda r: f"{map_open_us(r):.0f}")),
        ("bytes read from disk / record, cold",
         col(lambda r: f"{r['cold']['read_bytes_per_record']:,.0f}")),
        ("major faults / record, cold", col(lambda r: f"{r['cold']['major_faults_per_record']:.3f}")),
        ("open fds: base / max (LRU) / max (unbounded)",
         col(lambda r: f"{r['fds_base']} / {r['warm']['fds_max']} / {r['unbounded']['fds_max']}")),
        ("RSS MiB: base / built / warm / max",
         col(lambda r: f"{_mib(r['mem_base']['rss'])} / {_mib(r['mem_built']['rss'])} / "
                       f"{_mib(r['mem_warm']['rss'])} / {_mib(r['warm']['rss_max'])}")),
        ("PSS / USS / anon MiB, warm",
         col(lambda r: f"{_mib(r['mem_warm']['pss'])} / {_mib(r['mem_warm']['uss'])} / "
                       f"{_mib(r['mem_warm']['anon'])}")),
        ("anon MiB added: build / warm (over base)",
         col(lambda r: f"{_mib(r['mem_built']['anon'] - r['mem_base']['anon'])} / "
                       f"{_mib(r['mem_warm']['anon'] - r['mem_base']['anon'])}")),
        ("RSS MiB, LRU unbounded", col(lambda r: _mib(r["mem_unbounded"]["rss"]))),
        ("epoch rollover: boundary step s (records read)",
         col(lambda r: f"{r['rollover']['boundary_step_s']:.3f} "
                       f"({r['rollover']['boundary_records']})")),
        ("  slowest other step s", col(lambda r: f"{r['rollover']['max_other_step_s']:.3f}")),
        ("  µs / record read: boundary step / other steps",
         col(lambda r: f"{r['rollover']['boundary_s_per_record'] * 1e6:.0f} / "
                       f"{r['rollover']['other_s_per_record'] * 1e6:.0f}")),
        ("next epoch's order set-up s", col(lambda r: f"{r['rollover']['order_setup_s']:.4f}")),
    ]  # fmt: skip


def print_report(report: dict) -> None:
    rows = report_rows(report)
    width = max(len(name) for name, _ in rows)
    print(f"\n{report['records']:,} records, {report['shards']:,} shards, {report['world']} ranks,"
          f" rows of {report['seq_len']} tokens, {report['micro_batch_rows']} rows per "
          f"micro-batch, reader LRU {report['max_open_readers']} shards; {report['cpus']} CPUs, "
          "load average (1 min) before / after the ranks "
          f"{report['load_average'][0]:.1f} / {report['load_average'][1]:.1f}")  # fmt: skip
    print(f"| {'measure':<{width}} | " + " | ".join(f"rank {r['rank']}" for r in report["ranks"])
          + " |")  # fmt: skip
    print(f"|{'-' * (width + 2)}|" + "|".join("---" for _ in report["ranks"]) + "|")
    for name, values in rows:
        print(f"| {name:<{width}} | " + " | ".join(values) + " |")
    o = report["order_at_scale"]
    print(
        f"\norder at {o['records']:,} records, {o['ranks']:,} ranks: set-up + first block "
        f"{o['setup_s'] * 1e3:.1f} ms, {o['per_id_s'] * 1e9:.0f} ns per id"
    )
    p = report["projection"]
    print(f"\n{FORMULA}\n")
    print(f"projected to {p['records']:,} records, {p['shards']:,} shards, {p['ranks']:,} ranks:")
    for name, value in (
        ("disk", f"{p['disk_bytes'] / 2**30:,.0f} GiB"),
        ("start-up checks (shared by the ranks)", f"{p['verify_once_s']:,.1f} s"),
        ("dataset build per rank", f"{p['build_per_rank_s']:,.1f} s"),
        ("time to first batch", f"{p['first_batch_s']:,.0f} s"),
        ("metadata calls at start (all ranks)", f"{p['metadata_calls_at_start']:,}"),
        ("anonymous memory per rank", f"{_mib(p['anon_per_rank_bytes'])} MiB"),
        ("open fds per rank (at most)", f"{p['fds_per_rank_max']}"),
        (
            "records/s per rank (cluster)",
            f"{p['records_per_s_per_rank']:,.0f} ({p['records_per_s_cluster']:,.0f})",
        ),
        ("shard maps opened / record", f"{p['map_opens_per_record']:.4f}"),
        ("epoch rollover (order set-up)", f"{p['rollover_s'] * 1e3:.1f} ms"),
    ):
        print(f"  {name:<38} {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rank_of:
        Path(args.result).write_text(json.dumps(run_rank(args)))
        return 0
    keep = args.dir is not None
    folder = Path(args.dir) if keep else Path(tempfile.mkdtemp(prefix="data_scale_", dir="/tmp"))
    try:
        gen = generate(folder, args.records, args.shards, args.tokenizer, args.workers)
        gen["drop_cache_s"] = None if args.warm else drop_page_cache(folder)
        print_generation(args, gen)
        load = os.getloadavg()[0]  # other work on the machine slows every rate measured here
        ranks = launch_ranks(folder, args)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    report = {"records": args.records, "shards": args.shards, "world": args.ranks,
              "max_open_readers": ranks[0]["open_readers_limit"], "seq_len": args.seq_len,
              "micro_batch_rows": args.micro_batch_rows, "generation": gen, "ranks": ranks,
              "order_at_scale": order_at_scale(), "cpus": os.cpu_count(),
              "load_average": [load, os.getloadavg()[0]]}  # fmt: skip
    report["projection"] = project(report)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=10**8)
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="10^6 records, 200 shards, fewer steps")
    p.add_argument("--steps", type=int, default=100, help="steps per measured phase")
    p.add_argument("--rollover_steps", type=int, default=10, help="steps before the epoch end")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--micro_batch_rows", type=int, default=4)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="writer processes")
    p.add_argument("--dir", help="write (or reuse) the shard set here and keep it")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: trained here)")
    p.add_argument("--warm", action="store_true", help="do not drop the set's page cache")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--rank_of", help=argparse.SUPPRESS)  # internal: run one rank on this folder
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.shards, args.steps, args.rollover_steps = 10**6, 200, 12, 4
    return args


if __name__ == "__main__":
    sys.exit(main())
