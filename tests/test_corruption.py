"""Corrupt shard folders are refused by default, each in one line naming the file (and record).

Each case trained to the end (exit 0) before, or crashed at a later step naming nothing: a changed
token byte, an index offset past the end of the .bin, edited manifest totals, a swapped tokenizer
folder, a token id outside the vocabulary.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.dataset import PackedDataset
from data_pipeline.shards import ShardError, ShardReader, ShardWriter, sha256_file

SEQ = 256
VOCAB = 1000  # conftest's tokenizer
SHARD = "00000.train"


def make(folder: Path, **kw) -> PackedDataset:
    return PackedDataset(folder, **{"seq_len": SEQ, "predictor_tokens": 1, "seed": 7, **kw})


@pytest.fixture
def folder(bundled_shards, tmp_path) -> Path:
    """A private copy of the bundled shard folder, to damage."""
    return Path(shutil.copytree(bundled_shards, tmp_path / "shards"))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def refresh_manifest_entry(folder: Path, name: str) -> None:
    """Records the shard's current files in the manifest, as a writer with a bug would have."""
    manifest = manifest_of(folder)
    entry = next(s for s in manifest["shards"] if s["name"] == name)
    for ext in ("bin", "idx"):
        path = folder / "shards" / f"{name}.{ext}"
        entry[f"{ext}_bytes"], entry[f"{ext}_sha256"] = path.stat().st_size, sha256_file(path)
    write_manifest(folder, manifest)


def index_header_bytes(idx: Path) -> int:
    """Index format version 1: a 32-byte header; version 2 adds the max token id (40 bytes)."""
    version = struct.unpack_from("<I", idx.read_bytes(), 8)[0]
    return {1: 32, 2: 40}[version]


def downgrade_to_v1(prefix: Path) -> None:
    """Rewrites a shard's index in format version 1 (no max token id, no record CRCs), as shards
    written before those fields exist; the manifest is updated to match."""
    r = ShardReader(prefix)
    n, v = r.n_records, r.n_views
    idx = Path(f"{prefix}.idx")
    data = idx.read_bytes()
    body = data[index_header_bytes(idx) :][: n * (8 + 4 * v)]  # offsets, view lengths
    header = struct.pack("<8sIIQQ", b"JEPAIDX\x00", 1, v, n, r.n_tokens)
    idx.write_bytes(header + body)
    refresh_manifest_entry(prefix.parent.parent, prefix.name)


def rewrite_shard(folder: Path, name: str, edit) -> None:
    """Rewrites shard `name` through the shard writer with edit(records) applied, manifest
    updated: what a preprocessing run with a bug would leave."""
    prefix = folder / "shards" / name
    r = ShardReader(prefix)
    records = edit([[v.tolist() for v in r.record(i)] for i in range(len(r))])
    w = ShardWriter(prefix, n_views=r.n_views, dtype=r.dtype)
    for views in records:
        w.add(views)
    w.close()
    refresh_manifest_entry(folder, name)


def test_a_changed_token_byte_is_refused_when_its_record_is_read(folder):
    prefix = folder / "shards" / SHARD
    r = ShardReader(prefix)
    start = int(r.view_lengths[:5].sum())  # record 5's first token: records are back to back
    tokens = np.memmap(f"{prefix}.bin", dtype=r.dtype, mode="r+", offset=32, shape=(r.n_tokens,))
    tokens[start] ^= 1  # still a valid id (VOCAB is even): only a checksum can tell
    assert tokens[start] < VOCAB
    tokens.flush()
    del tokens
    ds = make(folder)  # start-up stays cheap: the .bin is not read
    assert [v.tolist() for v in ds.record(4)[1]]  # the records around it are sound
    with pytest.raises(
        ShardError,
        match=rf"{prefix}\.bin: record 5 \(tokens {start}\.\.\d+\) does not match its CRC32",
    ):
        ds.record(5)
    with pytest.raises(ShardError, match=rf"{SHARD}\.bin: record 5 "):
        while ds.next_batch(8) is not None:  # an epoch reads every record
            pass
    with pytest.raises(ShardError, match=rf"{SHARD}\.bin: sha256"):
        make(folder, verify_checksums=True)  # the full check still refuses it at start


@pytest.mark.parametrize("bug", ["past_end", "overlap"])
def test_an_index_offset_outside_its_place_is_refused_at_start(folder, bug):
    prefix = folder / "shards" / SHARD
    r = ShardReader(prefix)
    idx = Path(f"{prefix}.idx")
    data = bytearray(idx.read_bytes())
    at = index_header_bytes(idx) + 8 * 3  # offset of record 3
    prev_end = int(r.view_lengths[:3].sum())
    bad = r.n_tokens + 10 if bug == "past_end" else prev_end - 2
    struct.pack_into("<Q", data, at, bad)
    idx.write_bytes(bytes(data))
    expected = {
        "past_end": rf"{SHARD}\.idx: record 3 spans tokens {bad}\.\.\d+, past the end of .*{SHARD}\.bin \({r.n_tokens} tokens\)",
        "overlap": rf"{SHARD}\.idx: record 3 starts at token {bad}, but the records before it end at {prev_end}",
    }[bug]  # fmt: skip
    with pytest.raises(ShardError, match=rf"{SHARD}\.idx: sha256 .*differs.*; .*{expected}"):
        make(folder)
    refresh_manifest_entry(folder, SHARD)  # a writer bug: the manifest describes the bad index
    with pytest.raises(ShardError, match=expected):
        make(folder)


def _edit_split_records(m):
    m["splits"]["train"]["records"] += 1


def _edit_split_tokens(m):
    m["splits"]["val"]["tokens"] -= 7


def _edit_shard_view_tokens(m):  # the shard's total is unchanged
    m["shards"][0]["view_tokens"][0] += 5
    m["shards"][0]["view_tokens"][1] -= 5


def _edit_written_records(m):  # input = written + skipped still holds
    m["written_records"] += 3
    m["input_records"] += 3


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_edit_split_records, r"manifest\.json: splits\.train says 7596 records / "),
        (_edit_split_tokens, r"manifest\.json: splits\.val says \d+ records / \d+ tokens"),
        (_edit_shard_view_tokens, r"00000\.train\.idx: view tokens \[\d+, \d+\], manifest says"),
        (_edit_written_records, r"manifest\.json: written_records \d+, its shards hold \d+"),
    ],
    ids=["split_records", "split_tokens", "shard_view_tokens", "written_records"],
)
def test_edited_manifest_totals_are_refused(folder, edit, expected):
    manifest = manifest_of(folder)
    assert manifest["splits"]["train"]["records"] == 7595  # the expected messages rely on it
    edit(manifest)
    write_manifest(folder, manifest)
    with pytest.raises(ShardError, match=expected):
        make(folder)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """Another tokenizer: trained on the same corpus with a smaller vocabulary."""
    from conftest import BUNDLED

    from data_pipeline.sources import iter_view_texts
    from data_pipeline.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "other"
    train_tokenizer(iter_view_texts(str(BUNDLED / "test.jsonl"), "messages"), out, vocab_size=800)
    return out


def test_a_swapped_tokenizer_folder_is_refused(folder, other_tokenizer):
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(other_tokenizer, folder / "tokenizer")
    with pytest.raises(ShardError, match=rf"{folder}/tokenizer: tokenizer hash \w+… differs"):
        make(folder)


def _with_id_beyond_vocab(records):
    records[2][1][0] = VOCAB  # one id past the last (the shard's uint16 holds it)
    return records


def test_a_token_id_beyond_the_vocabulary_is_refused_at_start(folder):
    rewrite_shard(folder, SHARD, _with_id_beyond_vocab)
    expected = rf"{SHARD}\.idx: token ids up to {VOCAB}, but the vocabulary has {VOCAB} tokens"
    with pytest.raises(ShardError, match=expected):
        make(folder)


def test_old_shards_load_with_the_checks_they_allow(folder, bundled_shards, capsys):
    """Index format 1 (before per-record CRCs and the max token id) still loads: one warning per
    folder says what is not checked; ids are then checked against the vocabulary per record."""
    for idx in sorted((folder / "shards").glob("*.idx")):
        downgrade_to_v1(idx.with_suffix(""))
    ds, ref = make(folder), make(bundled_shards)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"WARNING: {folder}: shards of index format 1")
    assert "data.verify_checksums=true" in err[0]
    a, b = ds.next_batch(4), ref.next_batch(4)  # the same rows
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rewrite_shard(folder, SHARD, _with_id_beyond_vocab)
    downgrade_to_v1(folder / "shards" / SHARD)
    ds = make(folder)
    with pytest.raises(ShardError, match=rf"{SHARD}\.bin: record 2 holds token id {VOCAB}, but"):
        ds.record(2)


@pytest.mark.slow
def test_a_changed_token_stops_training_with_one_line(folder, tmp_path):
    """Through the real entry point: the record is read by the background packer; the error
    reaches the user as one line with exit status 2 (before: the run trained to the end)."""
    from engine_fixtures import launch, tiny_overrides

    for path in (folder / "shards").glob("*.train.bin"):
        tokens = np.memmap(path, dtype="<u2", mode="r+", offset=32)
        tokens ^= 1  # every id changed, every id still < VOCAB
        tokens.flush()
        del tokens
    over = tiny_overrides(folder, tmp_path / "run", **{"schedule.train_steps": 2,
                                                       "logging.eval_every_steps": 0})  # fmt: skip
    proc = launch(over, nproc=1, launcher="python", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {folder}/shards/0000") and ".train.bin: record " in last, last
    assert "does not match its CRC32" in last and "Traceback" not in proc.stderr


def _bad_bin_magic(folder: Path) -> None:
    path = folder / "shards" / f"{SHARD}.bin"
    path.write_bytes(b"XXXX" + path.read_bytes()[4:])


def _truncated_idx(folder: Path) -> None:
    path = folder / "shards" / f"{SHARD}.idx"
    path.write_bytes(path.read_bytes()[:-4])


def _no_shard_files(folder: Path) -> None:
    for path in (folder / "shards").iterdir():
        path.unlink()


def _manifest_count(folder: Path) -> None:
    manifest = manifest_of(folder)
    manifest["shards"][0]["tokens"] += 1
    write_manifest(folder, manifest)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_bad_bin_magic, rf"{SHARD}\.bin: bad magic b'XXXX"),
        (_truncated_idx, rf"{SHARD}\.idx: size \d+ bytes, header promises \d+: truncated"),
        (_no_shard_files, rf"{SHARD}\.bin: file is missing"),
        (
            _manifest_count,
            rf"{SHARD}: holds \d+ records / (\d+) tokens / 2 views of uint16 "
            r"\(index format 2\), manifest says \d+ / (?!\1)\d+ / 2 of uint16",
        ),
        (
            lambda f: rewrite_shard(f, SHARD, _with_id_beyond_vocab),
            rf"{SHARD}\.idx: token ids up to {VOCAB}, but the vocabulary has {VOCAB} tokens",
        ),
    ],
    ids=["bin_magic", "idx_truncated", "files_gone", "manifest_count", "id_beyond_vocab"],
)
def test_without_start_up_checks_a_bad_header_is_refused_at_the_first_read(folder, damage,
                                                                            expected):  # fmt: skip
    """Ranks build their datasets with verify=False (check_data_once checked the folder once):
    counts come from the manifest and no shard file is opened (even with every shard gone);
    the first read of a shard checks its headers, in the one line the checks would give."""
    assert manifest_of(folder)["shards"][0]["name"] == SHARD
    damage(folder)
    ds = make(folder, verify=False)
    assert len(ds.sources[0]) == 7595
    with pytest.raises(ShardError, match=rf"^{folder}/shards/{expected}"):
        ds.sources[0].record(0)  # its first record
    if damage is not _manifest_count:  # the start-up checks name the same problem
        with pytest.raises(ShardError, match=expected):
            make(folder)
