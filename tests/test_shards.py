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
