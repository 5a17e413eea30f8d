"""Preprocessing speed paths give the bytes of the plain ones: work units cut into parts (every
worker has work on a small input), the shard writer's batch and merge paths, the JSON decoder,
JSONL read and checked a block of lines at a time, the split hash in batches and the tokenizer
backend."""

import filecmp
import hashlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import BUNDLED, chat, write_jsonl

import data_pipeline.preprocess as pre
import data_pipeline.tokenizer as tok_lib
from data_pipeline import sources
from data_pipeline.shards import ShardReader, ShardWriter
from data_pipeline.verify import verify_folder


def run(inputs, out, tok, **kw):
    kw.setdefault("progress", False)
    return pre.preprocess(str(inputs), "messages", str(tok), str(out), **kw)


def assert_same_files(a: Path, b: Path, but=()) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        if f.name not in but:
            assert filecmp.cmp(a / f, b / f, shallow=False), f


def plan_parts(out: Path) -> list[int]:
    return [len(parts) for parts in json.loads((out / "plan.json").read_text())["parts"]]


def parts_of(monkeypatch, min_bytes: int) -> None:
    """Parts of at least min_bytes (1 << 40: a unit is one part)."""
    monkeypatch.setattr(pre, "PART_BYTES_MIN", min_bytes)
    monkeypatch.setattr(pre, "PART_BYTES_MAX", max(min_bytes, 8 << 20))


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory) -> Path:
    """The bundled train set with unparsable, too long and empty records spread through it."""
    bad = ['{"messages": [ not json', json.dumps(chat("x " * 600, "y")), json.dumps(chat(" ", "b")),
           "[1, 2]", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]  # fmt: skip
    lines = []
    for i, line in enumerate((BUNDLED / "train.jsonl").read_text().splitlines()):
        lines.append(line)
        if i % 331 == 7:
            lines.append(bad[i % len(bad)])
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", lines)


def test_parts_merge_into_the_bytes_of_whole_units(
    tmp_path, tokenizer_dir, monkeypatch, mixed_input
):
    kw = dict(shard_bytes=700_000, max_record_tokens=200, val_fraction=0.1)
    parts_of(monkeypatch, 1 << 40)
    whole = run(mixed_input, tmp_path / "whole", tokenizer_dir, **kw)
    assert plan_parts(tmp_path / "whole") == [1, 1, 1]
    assert whole["skipped"]["too_long"] and whole["skipped"]["bad_json"]
    assert len(whole["skip_examples"]) == 5
    parts_of(monkeypatch, 20_000)
    for workers in (1, 2):
        out = tmp_path / f"parts{workers}"
        assert run(mixed_input, out, tokenizer_dir, num_workers=workers, **kw) == whole
        assert min(plan_parts(out)) >= 10
        assert_same_files(tmp_path / "whole", out, but=("plan.json",))
        assert verify_folder(out) == []


def test_a_small_input_keeps_every_worker_busy(tmp_path, tokenizer_dir, monkeypatch):
    """Before, an input smaller than one unit (64 MiB) ran in one process whatever --num_workers."""
    lines = (BUNDLED / "train.jsonl").read_text().splitlines(keepends=True)
    src = tmp_path / "1mb.jsonl"
    src.write_text("".join(lines[: len(lines) // 2]))
    assert 0.9e6 < src.stat().st_size < 1.1e6
    pools = []
    real = pre.mp.get_context

    class Context:  # records the pools that the run starts
        def __init__(self, method):
            self._ctx = real(method)

        def Pool(self, processes, **kw):
            pools.append(processes)
            return self._ctx.Pool(processes, **kw)

    monkeypatch.setattr(pre.mp, "get_context", Context)
    run(src, tmp_path / "w2", tokenizer_dir, num_workers=2)
    assert pools == [2] and plan_parts(tmp_path / "w2") == [4]  # one unit, cut in 4 parts
    run(src, tmp_path / "w1", tokenizer_dir, num_workers=1)
    assert pools == [2]  # one worker: no pool
    assert_same_files(tmp_path / "w1", tmp_path / "w2")  # plan.json included


def test_a_failing_part_leaves_nothing_of_its_unit(
    tmp_path, tokenizer_dir, monkeypatch, mixed_input
):
    parts_of(monkeypatch, 20_000)
    out = tmp_path / "strict"
    # the first bad record of the part that fails first: parts run side by side
    with pytest.raises(
        pre.StrictError,
        match=rf"^{mixed_input}:\d+: (bad_json|bad_record|empty_view|missing_view): ",
    ):
        run(mixed_input, out, tokenizer_dir, num_workers=2, strict=True)
    assert list((out / "shards").iterdir()) == []


def test_parts_left_by_a_killed_run_are_redone(tmp_path, tokenizer_dir, monkeypatch, mixed_input):
    parts_of(monkeypatch, 20_000)
    out = tmp_path / "o"
    run(mixed_input, out, tokenizer_dir, shard_bytes=700_000)
    reference = tmp_path / "reference"
    run(mixed_input, reference, tokenizer_dir, shard_bytes=700_000)
    # Unit 1 killed while merging: its json not written yet, a merged .bin and parts left.
    (out / "shards" / "00001.json").unlink()
    (out / "manifest.json").unlink()
    left = [
        out / "shards" / "00001.train.tmp-part00003.bin",
        out / "shards" / "00001.val.bin.tmp99",
    ]
    for p in left:
        p.write_bytes(b"partial")
    run(mixed_input, out, tokenizer_dir, shard_bytes=700_000)
    assert not any(p.exists() for p in left) and verify_folder(out) == []
    assert_same_files(reference, out)


def test_full_disk_while_merging_parts(tmp_path, tokenizer_dir, monkeypatch, capsys, mixed_input):
    """The disk fills up while the driver merges a unit's parts (written by the workers)."""
    from test_preprocess import _FullDisk

    from data_pipeline import shards as shard_io

    parts_of(monkeypatch, 20_000)

    def preprocess_cli(out: Path, disk: _FullDisk) -> int:
        monkeypatch.setattr(shard_io, "open", disk, raising=False)  # this process: the merges
        return pre.main(["--inputs", str(mixed_input), "--views", "messages", "--tokenizer",
                         str(tokenizer_dir), "--out", str(out), "--shard_bytes", "700000",
                         "--num_workers", "2", "--progress", "False"])  # fmt: skip

    clean = _FullDisk(float("inf"))
    assert preprocess_cli(tmp_path / "clean", clean) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    assert preprocess_cli(out, _FullDisk(clean.written // 2)) == 1
    assert capsys.readouterr().err == f"error: no space left on device: {out / 'shards'}\n"
    assert [p for p in out.rglob("*") if ".tmp" in p.name] == []
    for p in (out / "shards").iterdir():  # only units that are complete are left
        assert pre.unit_is_done(out, int(p.name[:5])) is not None, p
    assert preprocess_cli(out, _FullDisk(float("inf"))) == 0
    assert_same_files(tmp_path / "clean", out)


def test_planning_reads_around_cuts_only_and_workers_number_the_lines(
    tmp_path, tokenizer_dir, monkeypatch, mixed_input
):
    """No task reads the corpus to count lines: planning reads a few KiB at each cut, the
    workers count lines, and every skip example (in the manifest, in each unit's json once
    resolved, in a --strict error) names the line of the bad record."""
    read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(
        sources, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False
    )
    parts = sources.plan_parts([mixed_input], 150_000, 20_000)
    monkeypatch.undo()
    size = mixed_input.stat().st_size
    assert len(parts) > 10 and sum(map(len, parts)) > 50
    assert sum(read) <= sum(map(len, parts)) * 4096 < size / 2

    lines = mixed_input.read_bytes().split(b"\n")
    kw = dict(shard_bytes=150_000, max_record_tokens=200, val_fraction=0.1)
    parts_of(monkeypatch, 20_000)
    m = run(mixed_input, tmp_path / "out", tokenizer_dir, num_workers=2, **kw)
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "out/shards").glob("*.json"))]
    assert any(isinstance(e, list) for meta in metas for e in meta["skip_examples"])
    examples = [e for meta in pre.resolve_lines(metas) for e in meta["skip_examples"]]
    assert len(examples) > 20 and m["skip_examples"] == examples[:5]
    bundled = set((BUNDLED / "train.jsonl").read_bytes().split(b"\n"))
    bad_lines = {i + 1 for i, line in enumerate(lines) if line not in bundled}  # the fixture's
    named = set()
    for e in examples:
        where, number = e.split(": ")[0].rsplit(":", 1)
        assert where == str(mixed_input) and int(number) in bad_lines, e
        named.add(int(number))
    assert max(named) > len(lines) / 2  # lines of late units too

    late = sorted(bad_lines)[len(bad_lines) // 2]  # --strict: the first bad line, far down
    data = b"\n".join(x for i, x in enumerate(lines) if i + 1 not in bad_lines or i + 1 == late)
    (tmp_path / "late.jsonl").write_bytes(data)
    first_bad = 1 + data[: data.index(lines[late - 1])].count(b"\n")
    with pytest.raises(pre.StrictError, match=f"^{tmp_path}/late.jsonl:{first_bad}: "):
        run(tmp_path / "late.jsonl", tmp_path / "strict", tokenizer_dir, strict=True, **kw)


@pytest.mark.parametrize("chars, records", [(1, 65536), (5_000, 7), (1 << 30, 300)])
def test_tokenizer_batches_do_not_change_the_output(
    tmp_path, tokenizer_dir, monkeypatch, mixed_input, chars, records
):
    """Records go to the tokenizer in batches of ENCODE_CHARS characters or ENCODE_BATCH
    records: any batch size writes the same bytes and the same skip examples."""
    kw = dict(shard_bytes=700_000, max_record_tokens=200, val_fraction=0.1)
    whole = run(mixed_input, tmp_path / "whole", tokenizer_dir, **kw)
    monkeypatch.setattr(pre, "ENCODE_CHARS", chars)
    monkeypatch.setattr(pre, "ENCODE_BATCH", records)
    assert run(mixed_input, tmp_path / "small", tokenizer_dir, **kw) == whole
    assert_same_files(tmp_path / "whole", tmp_path / "small")


def test_unit_cuts_do_not_depend_on_parts_and_parts_tile_them(tmp_path):
    rng = random.Random(0)
    for trial in range(200):
        lines = [b"x" * rng.choice([0, 1, 5, 30, 200, 3000]) for _ in range(rng.randint(0, 300))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.7 else b"")
        path = tmp_path / f"t{trial}.jsonl"
        path.write_bytes(data)
        shard_bytes = rng.choice([1, 7, 100, 1000, 5000, 1 << 20])
        whole = sources.plan_units([path], shard_bytes)
        parts = sources.plan_parts([path], shard_bytes, rng.choice([1, 3, 50, 400, shard_bytes]))
        assert [sources.join_parts(p) for p in parts] == whole, trial
        flat = [u for p in parts for u in p]
        assert flat[0].start == 0 and flat[-1].end == len(data)
        assert all(a.end == b.start > a.start for a, b in zip(flat, flat[1:]))
        for u in flat:  # each part starts a line; only a file's first is numbered (no count)
            assert u.start == 0 or data[u.start - 1] == ord("\n")
            assert u.first_line == (1 if u.start == 0 else 0)
            assert sources.line_number_at(str(path), u.start) == data[: u.start].count(b"\n") + 1


def test_writer_batch_and_merge_paths_write_the_same_bytes(tmp_path):
    rng = np.random.default_rng(0)
    records = [[rng.integers(0, 60_000, rng.integers(0, 9)).tolist() for _ in range(2)]
               for _ in range(300)]  # fmt: skip

    def written(name: str, fill) -> bytes:
        w = ShardWriter(tmp_path / name, n_views=2, dtype=np.dtype("<u2"))
        fill(w)
        w.close()
        return (tmp_path / f"{name}.bin").read_bytes() + (tmp_path / f"{name}.idx").read_bytes()

    def one_by_one(w, recs=records):
        for r in recs:
            w.add(r)

    def batches(w):
        for lo in range(0, len(records), 64):
            recs = records[lo : lo + 64]
            ids = np.array([t for r in recs for v in r for t in v], dtype=np.uint32)
            w.add_batch(ids, [[len(v) for v in r] for r in recs])

    reference = written("a", one_by_one)
    assert written("b", batches) == reference
    for lo, hi in ((0, 100), (100, 100), (100, 300)):  # the middle part is empty
        w = ShardWriter(tmp_path / f"part{lo}", n_views=2, dtype=np.dtype("<u2"), fsync=False)
        one_by_one(w, records[lo:hi])
        w.close()
    merged = written("c", lambda w: [w.append_shard(tmp_path / f"part{lo}") for lo in (0, 100)])
    assert merged == reference
    r = ShardReader(tmp_path / "c")
    assert [[v.tolist() for v in r.record(i)] for i in range(len(r))] == records  # CRCs hold
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    w = ShardWriter(tmp_path / "d", n_views=1, dtype=np.dtype("<u2"))
    with pytest.raises(ValueError, match="does not fit"):
        w.add([[70_000]])
    w.abort()


def _parse_with_json(raw: bytes):
    """The standard library's reading of a JSONL line (what preprocessing did before msgspec)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return ("bad_utf8", f"byte {e.start}")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return ("bad_json", e.msg)
    if not isinstance(record, dict):
        return ("bad_record", f"a JSON {type(record).__name__}, not an object")
    return record


@pytest.mark.parametrize("raw", [
    b'{"a": 1, "a": 2}', b'{"a": 123456789012345678901234567890}', b'{"a": 1e400}',
    b'{"a": NaN}', b'{"a": "\\ud800 lone"}', b'{"a": "\\ud83d\\ude00 pair"}', b'{"a": "\xff"}',
    b'{"a": "\xed\xa0\x80"}', b'\xef\xbb\xbf{"a": 1}', b'{"a": "tab\tin"}', b'{"a":1}{"b":2}',
    b'[1, 2]', b'"s"', b' {"a": [1.5, -0, true, null]} \r\n', b'{"messages": [ not json',
    b'{"a": "\\u0000\\/"}', b"",
])  # fmt: skip
def test_json_lines_read_as_the_standard_library_reads_them(raw):
    got = sources._parse_json_line(raw)
    if isinstance(got, sources.SkipRecord):
        got = (got.reason, got.detail)
    expected = _parse_with_json(raw)
    assert got == expected or (got != got and expected != expected)  # NaN != NaN
    if isinstance(expected, dict):
        assert [type(v) for v in got.values()] == [type(v) for v in expected.values()]


def test_encoder_gives_the_tokenizers_ids(tokenizer_dir, monkeypatch):
    from test_tokenizer import ALPHABET, probe_strings
    from tokenizers import Tokenizer

    texts = probe_strings() + [
        "".join(random.Random(i).choices(ALPHABET, k=60)) for i in range(300)
    ]
    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    hf.encode_special_tokens = True
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]

    def ids_of(encoder) -> list[list[int]]:
        flat, lengths = encoder(texts)
        return [a.tolist() for a in np.split(flat, np.cumsum(lengths)[:-1])]

    encoder = tok_lib.Encoder(str(tokenizer_dir / "tokenizer.json"))
    try:
        import gigatoken  # noqa: F401

        assert encoder.backend == "gigatoken"  # it agrees on this tokenizer: the fast path is used
    except ImportError:
        assert encoder.backend == "tokenizers"
    assert ids_of(encoder) == expected

    # A fast backend that disagrees, on the probe or on the first batch, is not used.
    def wrong(self, xs):
        return np.zeros(0, np.uint32), np.zeros(len(xs), np.int64)

    encoder = tok_lib.Encoder(str(tokenizer_dir / "tokenizer.json"))
    monkeypatch.setattr(encoder, "_fast_ids", wrong.__get__(encoder))
    assert ids_of(encoder) == expected and encoder.backend == "tokenizers"
    monkeypatch.setattr(tok_lib.Encoder, "_fast_ids", wrong)
    encoder = tok_lib.Encoder(str(tokenizer_dir / "tokenizer.json"))
    assert encoder.backend == "tokenizers" and ids_of(encoder) == expected


@pytest.mark.parametrize("texts, checked", [(["x" * 100_000] * 50, 3), (["word"] * 2000, 1024)])
def test_the_first_batch_check_is_bounded(tokenizer_dir, monkeypatch, texts, checked):
    """Both backends encode the first batch's first CHECK_TEXTS texts, or as many as make
    CHECK_CHARS (2**18) characters: long documents do not cost seconds per worker."""
    encoder = tok_lib.Encoder(str(tokenizer_dir / "tokenizer.json"))
    sizes, check = [], encoder._keep_fast_if_it_agrees
    monkeypatch.setattr(
        encoder, "_keep_fast_if_it_agrees", lambda xs: (sizes.append(len(xs)), check(xs))
    )
    encoder(texts)
    encoder(texts)
    assert sizes == [checked]


# Lines that a block of JSONL lines must treat as the record-by-record path does: for the views
# `text` / `q,a-b` (fields) and `messages`.
_U = {"role": "user", "content": "u"}
_A = {"role": "assistant", "content": "a"}
MANY_ROLES = [{"role": f"r{i}", "content": "c"} for i in range(7)]  # 9 messages
TRICKY = [
    b'{"text": "ok", "q": "1", "a-b": "2", "messages": [%s, %s]}' % (
        json.dumps(_U).encode(), json.dumps(_A).encode()),
    b'{"text": "x", "q": "1", "a-b": "2", "messages": [], "z": "tab\tin"}',
    b'{"text": "x", "q": "1", "a-b": "2", "z": "\xff"}', b'{"text": "x", "z": "\xed\xa0\x80"}',
    b'{"text": "x", "q": "1", "a-b": "2", "z": "\\ud800"}', b'{"text": "x", "z": 1e400}',
    b'{"text": "x", "z": NaN}', b'{"text": "a", "text": "b", "q": "", "a-b": "c"}',
    b'{"te\\u0078t": "esc", "q": "\\ud83d\\ude00", "a-b": "\\u0000"}', b'{"text": null}',
    b'{"text": 5}', b'{"text": ""}', b'{"text": " \\n "}', b'{"text": "\\ud800 lone"}',
    b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "a"} x', b'{"text": "a"},{"text": "b"}',
    b'{"text": "crlf", "q": "1", "a-b": "2"}\r', b"[1, 2]", b'"s"', b"", b"  ", b"\r",
    b'{"text": "caf\xc3\xa9 \xf0\x9f\x99\x82", "q": "\xe6\x9d\xb1", "a-b": "x"}',
    b'{"text": [1', b'2]}', b'{"text": "deep", "z": ' + b"[" * 300 + b"]" * 300 + b"}",
    *(json.dumps(r).encode() for r in (
        chat("u", "a"), chat("u", "a", system=""), chat("  ", "a"), chat("u", ""),
        chat("u", "a", system="  "), chat("u", "a", system="\u3000"), chat("\u2003", "a", "S"),
        chat("\u00e9", "a", "S\u00e9"), {"messages": [_U, _A, *MANY_ROLES]},
        {"messages": [_U, _A, {"role": "r\u00e9", "content": "c"}, {"role": "r\u00e9"}]},
        {"messages": [_U, _A, {"role": "tool", "content": "t", "name": "n"}]},
        {"messages": [_U, _A, _U]}, {"messages": [_U]}, {"messages": [_U, _A, "x"]},
        {"messages": [_U, _A, {"role": 5, "content": "t"}]}, {"messages": [_U, _A, {"content": "t"}]},
        {"messages": [_U, {"role": "assistant", "content": 1}]}, {"messages": {"role": "user"}},
    )),
]  # fmt: skip
# Valid records that the block path leaves to the record-by-record path (never wrong, slower):
# a lone surrogate escape or NaN in a field it does not read, a role that is not a string.
LEFT_TO_RECORDS = {4, 6, len(TRICKY) - 4, len(TRICKY) - 3}
# In C, also a record of more than 8 messages (data_pipeline/_native.c MAX_ROLES).
LEFT_TO_RECORDS_IN_C = {next(i for i, x in enumerate(TRICKY) if b'"r6"' in x)}


def _record_by_record(spec: sources.ViewSpec, lines: list[bytes]) -> list[str] | None:
    texts = []
    for raw in lines:
        record = sources._parse_json_line(raw) if raw and not raw.isspace() else None
        if record is None or isinstance(record, sources.SkipRecord):
            return None
        try:
            texts += spec.extract(record)
        except sources.SkipRecord:
            return None
    return texts


@pytest.mark.parametrize("in_c", [True, False])
@pytest.mark.parametrize("views, system_prompt", [
    ("text", "drop"), ("q,a-b", "drop"), ("messages", "drop"), ("messages", "prefix")])  # fmt: skip
def test_a_block_of_lines_gives_what_its_records_give(views, system_prompt, in_c, monkeypatch):
    """extract_block either gives each line's views, exactly as parsing and extracting the lines
    one by one does, or None (then preprocessing takes the block record by record); chat
    records in C or in Python."""
    if not in_c:
        monkeypatch.setattr(sources, "native", None)
    elif sources.native is None:
        pytest.skip("data_pipeline._native not built")
    spec = sources.ViewSpec.parse(views, system_prompt)
    good = TRICKY[0]
    fast, left = 0, LEFT_TO_RECORDS | (LEFT_TO_RECORDS_IN_C if in_c else set())
    for i, raw in enumerate(TRICKY):
        lines = [good, raw, good]
        expected, got = _record_by_record(spec, lines), spec.extract_block(b"\n".join(lines))
        assert got is None or got == expected, (i, raw)
        if expected is not None and i not in left:
            assert got == expected, (i, raw)
            fast += 1
    assert fast >= 4


@pytest.mark.parametrize("views", ["text", "messages"])
def test_one_decoding_call_per_block_never_merges_or_splits_lines(views):
    """A block whose lines all start with "{" and end with "}" is decoded in one call: a line
    that holds two objects, or part of one, still gives None (the record path names it)."""
    spec, good = sources.ViewSpec.parse(views), TRICKY[0]
    for lines in (
        [good + good], [good, good + good, good], [good, good[:-1] + b', "z": {"y": 1}',
        b'{"q": 2}}', good], [good[:-1] + b', "z": [{"y": 1}', b'{"q": 2}]}'], [good, b"{}"],
        [good[:-1] + b', "z": "}', b'{"}'], [good, good[:-1] + b', "z": "a\\n}{b"}', good],
    ):  # fmt: skip
        expected, got = _record_by_record(spec, lines), spec.extract_block(b"\n".join(lines))
        assert got is None or got == expected, lines
        assert (got is None) == (expected is None), lines
    calls = []
    decoder = sources._block_decoder(spec.mode, spec.fields)
    spy = SimpleNamespace(decode_lines=lambda b: calls.append(b) or decoder.decode_lines(b))
    assert sources._decode_lines(b"\n".join([good] * 3), spy) == [decoder.decode(good)] * 3
    assert calls


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1 << 20])
def test_blocks_of_lines_are_the_lines_of_every_unit(tmp_path, monkeypatch, block_bytes):
    """Plain units (any cut) and whole compressed files: every line once, in order, blocks
    numbered by their first line; the count returned is the number of lines."""
    import gzip

    import zstandard

    monkeypatch.setattr(sources, "BLOCK_BYTES", block_bytes)
    rng = random.Random(block_bytes)
    for trial in range(40):
        lines = [b"x" * rng.choice([0, 1, 5, 30, 200, 3000]) for _ in range(rng.randint(0, 60))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.7 else b"")
        path = tmp_path / f"t{trial}.jsonl"
        path.write_bytes(data)
        (tmp_path / f"t{trial}.jsonl.gz").write_bytes(gzip.compress(data))
        (tmp_path / f"t{trial}.jsonl.zst").write_bytes(zstandard.compress(data))
        units = [
            (u, data[u.start : u.end])
            for u in sources.plan_units([path], rng.choice([1, 100, 5000, 1 << 20]))
        ]
        units += [
            (u, data)
            for u in sources.plan_units(
                [tmp_path / f"t{trial}.jsonl.gz", tmp_path / f"t{trial}.jsonl.zst"], 1 << 20
            )
        ]
        for unit, expected in units:
            blocks = sources.iter_line_blocks(unit)
            got, index = [], 0
            while True:
                try:
                    first, n, block = next(blocks)
                except StopIteration as end:
                    count = end.value
                    break
                assert first == index
                assert n == block.count(b"\n") + 1
                got += block.split(b"\n")
                index = len(got)
            assert got == expected.splitlines(), unit
            assert count == len(got)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_blocks_and_records_write_the_same_bytes(tmp_path, tokenizer_dir, monkeypatch, kind):
    """A corpus with every kind of line above spread through it: read in blocks (of any size)
    or record by record, plain or compressed (a truncated file too), preprocessing writes the
    same bytes and names the same skips."""
    lines = []
    for i, line in enumerate((BUNDLED / "train.jsonl").read_bytes().splitlines()):
        lines.append(line if i % 97 else line + b"\r")
        if i % 41 == 5:
            lines.append(TRICKY[(i // 41) % len(TRICKY)])
        if i % 500 == 9:
            lines.append(json.dumps(chat("x " * 600, "y")).encode())
    data = b"\n".join(lines)
    inputs = [tmp_path / f"in.{kind}"]
    if kind == "jsonl":
        inputs[0].write_bytes(data)
    else:
        import gzip

        import zstandard

        compress = gzip.compress if kind.endswith("gz") else zstandard.compress
        inputs[0].write_bytes(compress(data))
        inputs.append(tmp_path / f"cut.{kind}")  # damaged: the lines before stay, one skip
        inputs[1].write_bytes(compress(data)[:-300])
    kw = dict(shard_bytes=300_000, max_record_tokens=200, val_fraction=0.1)
    for path in inputs:
        blocks = run(path, tmp_path / f"blocks-{path.name}", tokenizer_dir, **kw)
        assert {"bad_json", "bad_utf8", "bad_record", "missing_view", "empty_view",
                "too_long"} <= set(blocks["skipped"])  # fmt: skip
        with monkeypatch.context() as m:
            m.setattr(sources, "BLOCK_BYTES", 300)
            assert run(path, tmp_path / f"small-{path.name}", tokenizer_dir, **kw) == blocks
        with monkeypatch.context() as m:
            m.setattr(sources.ViewSpec, "extract_block", lambda self, block, lines=None: None)
            assert run(path, tmp_path / f"records-{path.name}", tokenizer_dir, **kw) == blocks
        for other in ("small", "records"):
            assert_same_files(tmp_path / f"blocks-{path.name}", tmp_path / f"{other}-{path.name}")
    if kind != "jsonl":
        assert set(blocks["skipped"]) & {"truncated_gzip", "truncated_zstd"}


@pytest.mark.parametrize("in_c", [True, False])
def test_the_split_in_batches_is_the_split_of_each_record(monkeypatch, in_c):
    """validation_mask is the per-record definition (blake2b of the views joined by U+001F, as
    a fraction of 2^64), computed with numpy over a batch, the digests in C or in Python."""
    if not in_c:
        monkeypatch.setattr(pre, "native", None)
    elif pre.native is None:
        pytest.skip("data_pipeline._native not built")

    def reference(views: list[str], fraction: float) -> bool:
        h = hashlib.blake2b("\x1f".join(views).encode("utf-8", "surrogatepass"), digest_size=8)
        return int.from_bytes(h.digest(), "little") / 2**64 < fraction

    rng = random.Random(0)
    alphabet = "ab é東🙂\x1f\n"
    for n_views in (1, 2, 3):
        texts = [
            "".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(3000 * n_views)
        ]
        records = [texts[i : i + n_views] for i in range(0, len(texts), n_views)]
        for fraction in (0.0, 1e-9, 0.05, 0.5, 0.999999, 1.0):
            mask = pre.validation_mask(texts, n_views, fraction)
            assert mask.tolist() == [reference(r, fraction) for r in records]
            assert pre.is_validation(records[0], fraction) == reference(records[0], fraction)
        assert 0.4 < pre.validation_mask(texts, n_views, 0.5).mean() < 0.6


def test_parquet_columns_and_rows_write_the_same_bytes(tmp_path, tokenizer_dir, monkeypatch):
    """Parquet: the view columns read whole (when they are strings without nulls, empty or
    blank values), row by row otherwise, or every column row by row: the same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    q, a, messages = [], [], []
    for i, line in enumerate((BUNDLED / "train.jsonl").read_text().splitlines()):
        by_role = {m["role"]: m["content"] for m in json.loads(line)["messages"]}
        user = (
            None if i % 37 == 3 else "" if i % 53 == 4 else "  " if i % 71 == 5 else by_role["user"]
        )
        user = "x " * 600 if i % 400 == 6 else user
        q.append(user)
        a.append(by_role["assistant"])
        messages.append(
            [{"role": "user", "content": user or ""}, {"role": "assistant", "content": a[-1]}]
        )
    table = pa.table({"q": pa.array(q, pa.string()), "a": pa.array(a, pa.large_string()),
                      "n": list(range(len(q))), "messages": messages})  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1500)
    kw = dict(progress=False, shard_bytes=300_000, max_record_tokens=200, val_fraction=0.1)

    def run_views(views: str, out: str) -> dict:
        return pre.preprocess(
            str(tmp_path / "in.parquet"), views, str(tokenizer_dir), str(tmp_path / out), **kw
        )

    def every_column(unit, columns):
        return sources.iter_parquet_batches(unit)

    for views in ("q,a", "a", "messages"):
        columns = run_views(views, f"columns-{views}")
        if views == "q,a":
            assert {"missing_view", "empty_view", "too_long"} <= set(columns["skipped"])
        with monkeypatch.context() as m:
            m.setattr(sources.ViewSpec, "extract_columns", lambda self, rows: None)
            assert run_views(views, f"rows-{views}") == columns
        with monkeypatch.context() as m:
            m.setattr(pre, "iter_parquet_batches", every_column)
            assert run_views(views, f"all-{views}") == columns
        for other in ("rows", "all"):
            assert_same_files(tmp_path / f"columns-{views}", tmp_path / f"{other}-{views}")
    rows = pq.read_table(tmp_path / "in.parquet").to_batches()[0]
    assert sources.ViewSpec.parse("a").extract_columns(rows) == a[: rows.num_rows]
    for views in ("q,a", "a,n", "a,missing", "messages"):  # a null; int; no column; not fields
        assert sources.ViewSpec.parse(views).extract_columns(rows) is None
