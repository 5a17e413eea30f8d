"""Preprocessing: formats, views, round trip, determinism, bad input, restart, memory."""

import errno
import filecmp
import gzip
import json
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import BUNDLED, chat, run_module, write_jsonl

from data_pipeline.dataset import PackedDataset
from data_pipeline.preprocess import preprocess, unit_is_done
from data_pipeline.shards import ShardReader
from data_pipeline.sources import SKIP_REASONS
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.verify import verify_folder


def all_records(folder: Path, split: str = "train") -> list[list[list[int]]]:
    m = json.loads((folder / "manifest.json").read_text())
    out = []
    for s in m["shards"]:
        if s["split"] == split:
            r = ShardReader(folder / "shards" / s["name"])
            out.extend([v.tolist() for v in r.record(i)] for i in range(len(r)))
    return out


def run(inputs, out, tok, views="messages", **kw):
    kw.setdefault("progress", False)
    return preprocess(str(inputs), views, str(tok), str(out), **kw)


def test_round_trip_every_view_decodes_to_its_text(tmp_path, tokenizer_dir):
    recs = [json.loads(line) for line in (BUNDLED / "test.jsonl").read_text().splitlines()[:300]]
    recs.append(chat("naïve café — 東京 🙂  two  spaces\nand a newline", "\\d{3}\t[a-z]+"))
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    m = run(src, tmp_path / "out", tokenizer_dir, val_fraction=0.0, shard_bytes=20_000)
    assert m["written_records"] == len(recs) and len(m["shards"]) > 4
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    decoded = [[tok.decode(v) for v in views] for views in all_records(tmp_path / "out")]
    expected = [[r["messages"][1]["content"], r["messages"][2]["content"]] for r in recs]
    assert decoded == expected
    # ... and through the dataset, read in epoch order, unshuffled
    ds = PackedDataset(tmp_path / "out", seq_len=512, shuffle=False, loop=False)
    seen = 0
    while (b := ds.next_batch(4)) is not None:
        seen += len(b["sample_ids"])
    assert seen == len(recs)


def test_output_identical_for_any_number_of_workers(tmp_path, tokenizer_dir):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run(BUNDLED / "train.jsonl", out, tokenizer_dir, num_workers=workers, shard_bytes=300_000)
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len(files) > 20
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for f in files:
        assert filecmp.cmp(outs[0] / f, outs[1] / f, shallow=False), f


def test_shard_index_count_split_equals_one_run(tmp_path, tokenizer_dir, bundled_shards):
    out = tmp_path / "array"
    kw = dict(num_workers=1, shard_bytes=400_000, val_fraction=0.05)
    assert (
        run(BUNDLED / "train.jsonl", out, tokenizer_dir, shard_index=0, shard_count=2, **kw) is None
    )
    m = run(BUNDLED / "train.jsonl", out, tokenizer_dir, shard_index=1, shard_count=2, **kw)
    assert m is not None
    assert (out / "manifest.json").read_bytes() == (bundled_shards / "manifest.json").read_bytes()


BAD = [
    chat("good one", "a+"),
    '{"messages": [ this is not json',
    {"messages": [{"role": "user", "content": "no answer"}]},
    chat("   ", "b+"),
    chat("x " * 600, "c+"),
    chat("good two", "d+"),
    "[1, 2]",
]


def _bad_input(tmp_path) -> Path:
    path = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with open(path, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
    return path


def test_bad_input_is_counted_by_reason(tmp_path, tokenizer_dir):
    path = _bad_input(tmp_path)
    m = run(path, tmp_path / "out", tokenizer_dir, max_record_tokens=200, val_fraction=0.0)
    assert m["input_records"] == 8 and m["written_records"] == 2
    assert {k: v for k, v in m["skipped"].items() if v} == {
        "bad_json": 1, "bad_utf8": 1, "bad_record": 1, "missing_view": 1, "empty_view": 1,
        "too_long": 1}  # fmt: skip
    assert list(m["skipped"]) == list(SKIP_REASONS)  # every reason, 0 or not
    assert m["input_records"] == m["written_records"] + sum(m["skipped"].values())
    locs = [e.split(": ")[0] for e in m["skip_examples"]]
    assert locs == [f"{path}:{n}" for n in (2, 3, 4, 5, 7)]  # first five, file:line


def test_strict_turns_first_bad_record_into_one_line_error(tmp_path, tokenizer_dir):
    path = _bad_input(tmp_path)
    proc = run_module("data_pipeline.preprocess", "--inputs", path, "--views", "messages",
                      "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", "--strict", check=False)  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"error: {path}:2: bad_json: Expecting value"]
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--inputs", "nope/*.jsonl"], "matches no file"),
        (["--views", ""], "--views"),
        (["--tokenizer", "/nonexistent"], "no tokenizer.json"),
        (["--val_fraction", "1.5"], "--val_fraction"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, tokenizer_dir, args, message):
    base = {"--inputs": str(BUNDLED / "test.jsonl"), "--views": "messages",
            "--tokenizer": str(tokenizer_dir), "--out": str(tmp_path / "o")}  # fmt: skip
    base.update(dict(zip(args[::2], args[1::2])))
    proc = run_module(
        "data_pipeline.preprocess", *[x for kv in base.items() for x in kv], check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_input_formats_give_the_same_records(tmp_path, tokenizer_dir):
    import datasets

    rows = [{"question": f"q {i} ünï", "sql": f"SELECT {i}", "text": f"doc {i}"} for i in range(50)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "d_disk"))
    results = {}
    for name in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d_disk"):
        m = run(
            tmp_path / name,
            tmp_path / f"out_{name}",
            tokenizer_dir,
            views="question,sql",
            val_fraction=0,
        )
        assert m["written_records"] == 50 and m["settings"]["views"]["names"] == ["question", "sql"]
        results[name] = all_records(tmp_path / f"out_{name}")
    assert all(r == results["a.jsonl"] for r in results.values())
    m = run(tmp_path / "a.jsonl", tmp_path / "single", tokenizer_dir, views="text", val_fraction=0)
    assert m["splits"]["train"]["view_tokens"] == [m["splits"]["train"]["tokens"]]
    # a glob over several files reads them all
    m = run(
        f"{tmp_path}/[ab].jsonl*",
        tmp_path / "glob",
        tokenizer_dir,
        views="question,sql",
        val_fraction=0,
    )
    assert m["input_records"] == 100 and len(m["inputs"]) == 2


def test_system_prompt_prefix_and_lm_loss_views(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "c.jsonl", [chat("what", "ab", system="Sys.")])
    m = run(
        src,
        tmp_path / "p",
        tokenizer_dir,
        system_prompt="prefix",
        lm_loss_views="1",
        val_fraction=0,
    )
    tok = load_tokenizer(tmp_path / "p" / "tokenizer")
    assert tok.decode(all_records(tmp_path / "p")[0][0]) == "Sys.\n\nwhat"
    assert m["settings"]["lm_loss_views"] == [1] and m["settings"]["lm_views"] == [0, 1]


def test_validation_split_is_stable_and_sized(bundled_shards, tmp_path, tokenizer_dir):
    m = json.loads((bundled_shards / "manifest.json").read_text())
    val, train = m["splits"]["val"]["records"], m["splits"]["train"]["records"]
    assert 0.03 < val / (val + train) < 0.07
    # the split depends on content, not position: reversed input, same validation records
    lines = (BUNDLED / "train.jsonl").read_text().splitlines()
    write_jsonl(tmp_path / "rev.jsonl", lines[::-1])
    m2 = run(tmp_path / "rev.jsonl", tmp_path / "rev", tokenizer_dir, val_fraction=0.05)
    assert sorted(all_records(tmp_path / "rev", "val")) == sorted(
        all_records(bundled_shards, "val")
    )
    assert m2["splits"]["val"]["records"] == val


def test_rerun_skips_finished_and_redoes_partial_shards(tmp_path, tokenizer_dir):
    out = tmp_path / "o"
    run(BUNDLED / "test.jsonl", out, tokenizer_dir, shard_bytes=100_000)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    (out / "shards" / "00002.json").unlink()  # a shard whose task died before finishing
    (out / "shards" / "00003.train.bin").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    m = run(BUNDLED / "test.jsonl", out, tokenizer_dir, shard_bytes=100_000)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert after["00000.train.bin"] == before["00000.train.bin"]  # untouched
    assert after["00002.train.bin"] != before["00002.train.bin"]  # redone
    assert unit_is_done(out, 3) is not None and verify_folder(out) == []
    assert m["input_records"] == 2000
    with pytest.raises(ValueError, match="other settings"):
        run(BUNDLED / "test.jsonl", out, tokenizer_dir, shard_bytes=100_000, max_record_tokens=7)


def test_temporary_files_of_a_killed_writer_are_reported_and_cleaned(tmp_path, tokenizer_dir):
    """Before: `*.bin.tmp<pid>` files of a killed preprocessing run stayed for good, and verify
    said OK."""
    out = tmp_path / "o"
    run(BUNDLED / "test.jsonl", out, tokenizer_dir, shard_bytes=100_000)
    (out / "shards" / "00001.json").unlink()  # unit 1's task was killed while writing
    stale = [out / "shards" / "00001.train.bin.tmp4242", out / "shards" / "00001.val.idx.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    problems = verify_folder(out)
    assert [p.split(":")[0] for p in problems] == [str(p) for p in sorted(stale)], problems
    assert all("temporary file of a killed or failed writer" in p for p in problems)
    run(BUNDLED / "test.jsonl", out, tokenizer_dir, shard_bytes=100_000)  # the rerun redoes unit 1
    assert not any(p.exists() for p in stale)
    assert verify_folder(out) == []


MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_memory_does_not_grow_with_input_size(tmp_path, tokenizer_dir):
    """Peak RSS of a 16x larger input stays within a small budget of the small one's."""
    text = (BUNDLED / "train.jsonl").read_bytes()
    (tmp_path / "small.jsonl").write_bytes(text)
    with open(tmp_path / "big.jsonl", "wb") as f:
        for _ in range(16):  # ~33 MB
            f.write(text)
    peaks = {}
    for name in ("small", "big"):
        cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "data_pipeline.preprocess",
               "--inputs", str(tmp_path / f"{name}.jsonl"), "--views", "messages",
               "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / name),
               "--shard_bytes", "1000000", "--progress", "False"]  # fmt: skip
        import subprocess

        peaks[name] = (
            int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout) / 1024
        )
    assert peaks["big"] < peaks["small"] + 48, peaks  # MiB


def _damaged_gzips(tmp_path) -> tuple[Path, Path, int]:
    """A .jsonl.gz cut in half and a plain JSONL file named .jsonl.gz; the number of whole lines
    that the first half holds (decompressed independently, by zlib)."""
    import zlib

    lines = "".join(json.dumps(chat(f"question {i}", f"answer {i}")) + "\n" for i in range(3000))
    data = gzip.compress(lines.encode())
    cut = tmp_path / "a_cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    whole_lines = zlib.decompressobj(31).decompress(cut.read_bytes()).count(b"\n")
    assert 0 < whole_lines < 3000
    not_gzip = tmp_path / "b_plain.jsonl.gz"
    not_gzip.write_text(lines[:1000])
    return cut, not_gzip, whole_lines


def test_damaged_gzip_keeps_the_lines_before_the_damage_and_counts_the_rest(
    tmp_path, tokenizer_dir
):
    """Before: EOFError / BadGzipFile traceback naming no file, every record lost, and the other
    worker's `*.bin.tmp<pid>` files left behind."""
    cut, not_gzip, whole_lines = _damaged_gzips(tmp_path)
    good = BUNDLED / "train.jsonl"
    n_good = len(good.read_text().splitlines())
    args = ["--views", "messages", "--tokenizer", tokenizer_dir, "--num_workers", "2",
            "--val_fraction", "0", "--progress", "False"]  # fmt: skip
    proc = run_module("data_pipeline.preprocess", "--inputs", f"{cut},{not_gzip},{good}", *args,
                      "--out", tmp_path / "o", check=False)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["written_records"] == whole_lines + n_good
    assert {k: v for k, v in m["skipped"].items() if v} == {"truncated_gzip": 1, "bad_gzip": 1}
    assert m["input_records"] == m["written_records"] + 2
    truncated = (f"{cut}:{whole_lines + 1}: truncated_gzip: compressed data ends early "
                 "(file cut short); the rest is lost")  # fmt: skip
    not_gz = f"{not_gzip}:1: bad_gzip: Not a gzipped file (b'{{\"'); the rest of the file is lost"
    assert m["skip_examples"] == [truncated, not_gz]
    assert f"[preprocess]   skipped {truncated}" in proc.stdout.splitlines()
    assert verify_folder(tmp_path / "o") == []
    # --strict: one line, exit 2, and nothing of any unit left (the other worker was stopped)
    proc = run_module("data_pipeline.preprocess", "--inputs", f"{cut},{good}", *args,
                      "--out", tmp_path / "s", "--strict", check=False)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {truncated}", proc.stderr
    assert list((tmp_path / "s" / "shards").iterdir()) == []


def _record(views: str, first: str, second: str = "SELECT 1") -> dict:
    if views == "messages":
        return chat(first, second)
    return {"text": first} if views == "text" else {"question": first, "sql": second}


@pytest.mark.parametrize(
    "views, bad, where",
    [
        ("text", {"text": "abc \ud800 def"}, "view 'text': lone surrogate U+D800 at character 4"),
        ("question,sql", _record("question,sql", "ok", "\udc00 x"), "view 'sql': lone surrogate U+DC00 at character 0"),
        ("messages", chat("what \ud83d", "x"), "view 'user': lone surrogate U+D83D at character 5"),
    ],
)  # fmt: skip
def test_lone_surrogate_escape_is_counted_by_reason(tmp_path, tokenizer_dir, views, bad, where):
    """A JSON escape like "\\ud800" without its pair. Before: a `tokenizers` TypeError ("TextEncodeInput
    must be Union[...]") naming neither file nor line, and no output."""
    records = [_record(views, "a pair \U0001f600 is fine"), bad, _record(views, "two")]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    assert "\\ud" in path.read_text().splitlines()[1]  # the escape, as scraped JSONL has it
    m = run(path, tmp_path / "out", tokenizer_dir, views=views, val_fraction=0.0)
    assert m["written_records"] == 2 and m["input_records"] == 3
    assert {k: v for k, v in m["skipped"].items() if v} == {"lone_surrogate": 1}
    assert m["skip_examples"] == [
        f"{path}:2: lone_surrogate: {where} (half of a UTF-16 pair, not text)"
    ]
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert tok.decode(all_records(tmp_path / "out")[0][0]) == "a pair \U0001f600 is fine"


class _FullDisk:
    """Stands in for `open` in data_pipeline.shards (every shard, index and json write of
    preprocessing): a write fails with ENOSPC, as on a full disk, once `budget` bytes are used."""

    def __init__(self, budget: float):
        self.budget, self.written = budget, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return f if mode in ("r", "rb") else _FileOn(f, self)


class _FileOn:
    def __init__(self, f, disk: _FullDisk):
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        if self._disk.written + len(data) > self._disk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.written += len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("where", ["plan.json", "shards", "manifest.json"])
def test_full_disk_is_one_line_and_leaves_nothing_a_rerun_would_trust(
    tmp_path, tokenizer_dir, monkeypatch, capsys, where
):
    """The disk fills up while plan.json, a shard or manifest.json is written. Before: an OSError
    traceback ("[Errno 28] No space left on device") naming no file."""
    from data_pipeline import shards as shard_io
    from data_pipeline.preprocess import main

    def preprocess_cli(out: Path, disk: _FullDisk) -> int:
        monkeypatch.setattr(shard_io, "open", disk, raising=False)
        return main(["--inputs", str(BUNDLED / "test.jsonl"), "--views", "messages",
                     "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     "--shard_bytes", "100000", "--progress", "False"])  # fmt: skip

    clean = _FullDisk(float("inf"))
    assert preprocess_cli(tmp_path / "clean", clean) == 0
    budget = {"plan.json": 0, "shards": clean.written // 2, "manifest.json": clean.written - 1}
    out = tmp_path / "out"
    capsys.readouterr()
    assert preprocess_cli(out, _FullDisk(budget[where])) == 1
    assert capsys.readouterr().err == f"error: no space left on device: {out / where}\n"
    assert [p for p in out.rglob("*") if ".tmp" in p.name] == []
    assert not (out / "manifest.json").exists()
    for p in (out / "shards").iterdir():  # only units that are complete are left
        assert unit_is_done(out, int(p.name[:5])) is not None, p
    # with space again, the rerun gives what a run that never failed gives
    assert preprocess_cli(out, _FullDisk(float("inf"))) == 0
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "clean") for p in (tmp_path / "clean").rglob("*") if p.is_file()
    )
    for f in files:
        assert filecmp.cmp(out / f, tmp_path / "clean" / f, shallow=False), f


# Runs inside `unshare --user --map-root-user --mount` (no root needed where user namespaces are
# allowed): mounts a tmpfs of each size in turn on MNT, runs the command, reports what happened.
ON_TINY_DISK = """
import json, subprocess, sys
from pathlib import Path
mnt, sizes, cmd = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
report = []
for i, size in enumerate(sizes):
    opts = f"size={size}" if i == 0 else f"remount,size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "none", str(mnt)], check=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(str(f.relative_to(mnt)) for f in mnt.rglob("*") if f.is_file())
    report.append({"rc": p.returncode, "stderr": p.stderr, "files": files})
p = subprocess.run([sys.executable, "-m", "data_pipeline.verify", str(mnt / "out")],
                   capture_output=True, text=True)
report.append({"rc": p.returncode, "stdout": p.stdout})
print(json.dumps(report))
"""


def test_full_disk_for_real_on_a_tiny_filesystem(tmp_path, tokenizer_dir):
    """A tmpfs too small for the tokenizer copy, then too small for the shards, then big enough."""
    import subprocess

    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"]).returncode:
        pytest.skip("no user namespaces here (unshare) to mount a tiny filesystem without root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tok_kib = sum(-(-f.stat().st_size // 4096) * 4 for f in tokenizer_dir.iterdir())
    sizes = f"32k,{tok_kib + 48}k,8m"
    preprocess_cmd = [sys.executable, "-m", "data_pipeline.preprocess",
                      "--inputs", str(BUNDLED / "test.jsonl"), "--views", "messages",
                      "--tokenizer", str(tokenizer_dir), "--out", str(mnt / "out"),
                      "--shard_bytes", "100000", "--progress", "False"]  # fmt: skip
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable,
                           "-c", ON_TINY_DISK, str(mnt), sizes, *preprocess_cmd],
                          capture_output=True, text=True, cwd=BUNDLED.parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    in_tokenizer, in_shards, enough, verify = json.loads(proc.stdout)
    out = mnt / "out"
    assert in_tokenizer["rc"] == 1 and in_tokenizer["files"] == ["out/plan.json"]
    message = in_tokenizer["stderr"].splitlines()
    assert len(message) == 1 and re.fullmatch(
        f"error: no space left on device: {out}/tokenizer.tmp[0-9]+/tokenizer.json", message[0]
    )
    assert in_shards["rc"] == 1
    assert in_shards["stderr"] == f"error: no space left on device: {out}/shards\n"
    left = [f for f in in_shards["files"] if f.startswith("out/shards/")]
    assert not any("tmp" in f or "manifest" in f for f in in_shards["files"])
    complete = {f[11:16] for f in left if f.endswith(".json")}  # units with their json
    assert {f[11:16] for f in left} == complete and len(left) == 5 * len(complete)
    assert enough["rc"] == 0 and "out/manifest.json" in enough["files"], enough["stderr"]
    assert verify["rc"] == 0 and verify["stdout"].startswith(f"OK {out}: ")


def test_zstd_jsonl_streams_every_frame_and_counts_damage(tmp_path, tokenizer_dir):
    """.jsonl.zst as Dolma and The Pile ship it: a multi-frame file reads whole, the same records
    as the plain file; a file cut inside a frame keeps the lines before the cut and counts the
    rest as one truncated_zstd skip (zstandard's own stream reader returns nothing, silently);
    a file that is not zstd is one bad_zstd skip."""
    import zstandard

    lines = [json.dumps(chat(f"question {i}", f"answer {i}")) + "\n" for i in range(3000)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(lines))
    frames = [zstandard.ZstdCompressor().compress("".join(lines[i : i + 700]).encode())
              for i in range(0, 3000, 700)]  # fmt: skip
    whole = tmp_path / "a_frames.jsonl.zst"
    whole.write_bytes(b"".join(frames))
    cut = tmp_path / "b_cut.jsonl.zst"
    cut.write_bytes(frames[0] + frames[1][: len(frames[1]) // 2])
    not_zstd = tmp_path / "c_plain.jsonl.zst"
    not_zstd.write_text("".join(lines[:10]))
    args = ["--views", "messages", "--tokenizer", tokenizer_dir, "--val_fraction", "0",
            "--progress", "False"]  # fmt: skip
    run_module("data_pipeline.preprocess", "--inputs", str(plain), *args, "--out", tmp_path / "p")
    run_module("data_pipeline.preprocess", "--inputs", str(whole), *args, "--out", tmp_path / "z")
    reference = json.loads((tmp_path / "p" / "manifest.json").read_text())["splits"]
    assert json.loads((tmp_path / "z" / "manifest.json").read_text())["splits"] == reference
    proc = run_module("data_pipeline.preprocess", "--inputs", f"{cut},{not_zstd}", *args,
                      "--out", tmp_path / "d", check=False)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    kept = zstandard.ZstdDecompressor().decompressobj().decompress(frames[0]).count(b"\n")
    assert kept == 700 and m["written_records"] >= kept  # frame 0 whole, and part of frame 1
    assert {k: v for k, v in m["skipped"].items() if v} == {"truncated_zstd": 1, "bad_zstd": 1}
    assert any(e.startswith(f"{cut}:") and "truncated_zstd" in e for e in m["skip_examples"])


# One task of a Slurm array: plan_parts is wrapped to log each call and take 1 s, so that the
# other tasks, started at the same moment, find the planning lock taken.
ARRAY_TASK = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import data_pipeline.preprocess as pre
real = pre.plan_parts
def logged(*a, **kw):
    with open(sys.argv[2], "a") as f:
        f.write("planned\n")
    time.sleep(1.0)
    return real(*a, **kw)
pre.plan_parts = logged
pre.preprocess(sys.argv[3], "messages", sys.argv[4], sys.argv[5], shard_bytes=200_000,
               shard_index=int(sys.argv[6]), shard_count=3, progress=False)
"""


def test_an_array_plans_once_for_all_its_tasks(tmp_path, tokenizer_dir):
    """Before, every task of a preprocessing array read the whole corpus to plan the units."""
    import subprocess

    log, out = tmp_path / "plans.log", tmp_path / "out"
    tasks = [subprocess.Popen([sys.executable, "-c", ARRAY_TASK, str(Path(__file__).parents[1]),
                               str(log), str(BUNDLED / "train.jsonl"), str(tokenizer_dir), str(out),
                               str(i)], stderr=subprocess.PIPE, text=True) for i in range(3)]  # fmt: skip
    for t in tasks:
        _, err = t.communicate(timeout=300)
        assert t.returncode == 0, err
    assert log.read_text() == "planned\n"
    assert not (out / "plan.lock").exists() and (out / "manifest.json").exists()
    assert verify_folder(out) == []
    # A lock left by a task that died is taken over once it is stale.
    os.utime(out / "plan.json", (0, 0))
    (out / "plan.json").unlink()
    (out / "plan.lock").touch()
    os.utime(out / "plan.lock", (1, 1))
    proc = subprocess.run([sys.executable, "-c", ARRAY_TASK, str(Path(__file__).parents[1]),
                           str(log), str(BUNDLED / "train.jsonl"), str(tokenizer_dir), str(out), "0"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "its task is gone; planning here" in proc.stderr, proc.stderr
    assert log.read_text() == "planned\nplanned\n"


def test_cli_takes_several_inputs_after_one_flag_and_refuses_a_stray_word(
    tmp_path, tokenizer_dir, capsys
):
    """`--inputs a b` as the tokenizer command takes it. Before: fire passed `b` to the next
    parameter (max_record_tokens) and the first batch died with a TypeError traceback."""
    from data_pipeline.preprocess import main

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lines = (BUNDLED / "test.jsonl").read_text().splitlines(keepends=True)
    a.write_text("".join(lines[:30]))
    b.write_text("".join(lines[30:50]))
    flags = ["--views", "messages", "--tokenizer", str(tokenizer_dir), "--progress", "False"]
    assert main(["--inputs", str(a), str(b), "--out", str(tmp_path / "o"), *flags]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["input_records"] == 50 and len(manifest["inputs"]) == 2
    capsys.readouterr()
    assert main(["--inputs", str(a), "--out", str(tmp_path / "p"), "stray", *flags]) == 2
    assert capsys.readouterr().err == (
        "error: unexpected argument 'stray': every option is a --flag VALUE pair\n"
    )
