"""Shard files: round trip, dtype choice, header checks; verify catches corruption."""

import numpy as np
import pytest

from data_pipeline.shards import ShardError, ShardReader, ShardWriter, dtype_for_vocab
from data_pipeline.verify import main as verify_main
from data_pipeline.verify import verify_folder


@pytest.mark.parametrize("vocab", [1000, 70_000])
def test_round_trip(tmp_path, vocab):
    dtype = dtype_for_vocab(vocab)
    assert dtype.itemsize == (2 if vocab <= 65536 else 4)
    w = ShardWriter(tmp_path / "s", n_views=2, dtype=dtype)
    recs = [[[1, 2, 3], [vocab - 1]], [[5], [6, 7]], [[8, 9], [10]]]
    for r in recs:
        w.add(r)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]  # no temp files left
    r = ShardReader(tmp_path / "s", vocab_size=vocab)
    assert (len(r), r.n_tokens, r.n_views) == (3, 10, 2)
    assert [[v.tolist() for v in r.record(i)] for i in range(3)] == recs
    assert r.view_lengths.tolist() == [[3, 1], [1, 2], [2, 1]]
    assert r.check_index() == [6, 4]  # tokens per view
    assert (r.has_checksums, r.max_token_id) == (True, vocab - 1)
    with pytest.raises(
        ShardError,
        match=rf"s\.idx: token ids up to {vocab - 1}, but the vocabulary has {vocab - 1} tokens",
    ):
        ShardReader(tmp_path / "s", vocab_size=vocab - 1)


def _write(tmp_path):
    w = ShardWriter(tmp_path / "s", n_views=1, dtype=np.dtype("<u2"))
    w.add([[1, 2, 3]])
    w.close()
    return tmp_path / "s"


def test_reader_refuses_truncated_and_bad_magic(tmp_path):
    prefix = _write(tmp_path)
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(data[:-1])
    with pytest.raises(ShardError, match=r"s\.bin: size .* truncated"):
        ShardReader(prefix)
    (tmp_path / "s.bin").write_bytes(b"XXXX" + data[4:])
    with pytest.raises(ShardError, match=r"s\.bin: bad magic"):
        ShardReader(prefix)
    (tmp_path / "s.bin").unlink()
    with pytest.raises(ShardError, match=r"s\.bin: file is missing"):
        ShardReader(prefix)


def test_verify_catches_flipped_byte_and_truncation(bundled_shards, tmp_path, capsys):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(bundled_shards, folder)
    assert verify_folder(folder) == []
    assert verify_main([str(folder)]) == 0
    victim = folder / "shards" / "00001.train.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert verify_folder(folder, full=False) == []  # sizes and headers still agree
    problems = verify_folder(folder)
    assert len(problems) == 1 and "00001.train.bin: sha256" in problems[0]
    victim.write_bytes(bytes(data[:-2]))
    problems = verify_folder(folder, full=False)
    assert any("00001.train.bin" in p and "truncated" in p for p in problems)
    capsys.readouterr()
    assert verify_main([str(folder)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out and all("00001.train.bin" in line for line in out)
    (folder / "manifest.json").unlink()
    assert "manifest.json: missing" in verify_folder(folder)[0]


def test_open_shards_are_bounded_by_the_process_limits(tmp_path, monkeypatch):
    """The reader LRU holds as many shards as the open-file limit (raised to the hard limit) and
    vm.max_map_count leave: two descriptors and two map areas per shard, a reserve for the rest
    of the process, at least MIN_OPEN_READERS."""
    import resource

    from data_pipeline import shards

    raised = []

    def limit(soft: int, hard: int, max_maps: int | None) -> int:
        monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, hard))
        monkeypatch.setattr(resource, "setrlimit", lambda _, new: raised.append(new))
        monkeypatch.setattr(shards, "_max_map_count", lambda: max_maps)
        monkeypatch.setattr(shards, "_derived_limit", None)
        return shards.open_readers_limit()

    monkeypatch.setattr(shards, "MAX_OPEN_READERS", None)
    assert limit(256, 256, 65530) == 64 and raised == []  # `ulimit -n 256`: (256 - 128) / 2
    assert limit(1024, 4096, None) == 1536 and raised == [(4096, 4096)]  # (4096 - 1024) / 2
    assert limit(1024, 524288, 65530) == 16382  # half the map areas, two per shard
    assert limit(40, 40, 65530) == shards.MIN_OPEN_READERS

    # The LRU follows the bound: 5 shards read in turn under a bound of 2 keep 2 open.
    monkeypatch.setattr(shards, "_derived_limit", 2)
    readers = []
    for k in range(5):
        w = ShardWriter(tmp_path / f"s{k}", n_views=1, dtype=np.dtype("<u2"))
        w.add([[k, k + 1]])
        w.close()
        readers.append(ShardReader(tmp_path / f"s{k}"))
    for _ in range(2):
        assert [r.record(0)[0].tolist() for r in readers] == [[k, k + 1] for k in range(5)]
        assert shards.open_readers() == 2
