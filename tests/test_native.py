"""data_pipeline/_native.c: the split digests and record CRCs in C give the bytes the Python
definitions give (hashlib's BLAKE2b, zlib's CRC32), and preprocessing writes the same shards
with it as without it."""

import hashlib
import json
import os
import random
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import BUNDLED, write_jsonl
from test_preprocess_parts import assert_same_files, run

import data_pipeline.preprocess as pre
import data_pipeline.shards as shard_io
import data_pipeline.sources as sources
from data_pipeline.native import native

needs_native = pytest.mark.skipif(native is None, reason="data_pipeline._native not built")


def test_the_extension_is_built():
    """`make setup` compiles it (gcc and Python's headers are on every machine we set up); a
    build that failed quietly (setup.py marks it optional) would only make preprocessing slower."""
    if os.environ.get("LLM_JEPA_PURE_PYTHON") == "1":
        pytest.skip("LLM_JEPA_PURE_PYTHON=1")
    assert native is not None, "data_pipeline/_native.c was not built: run `make setup` with gcc"


def _texts(rng: random.Random, n: int) -> list[str]:
    """Lengths around BLAKE2b's 128-byte blocks, 1- to 4-byte UTF-8 characters, separators."""
    alphabet = "ab \x1f\né東🙂"
    lengths = (0, 1, 42, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000)
    return ["".join(rng.choices(alphabet, k=rng.choice(lengths))) for _ in range(n)]


@needs_native
@pytest.mark.parametrize("n_views", [1, 2, 3])
def test_split_digests_are_blake2b_of_the_joined_views(n_views):
    rng = random.Random(n_views)
    texts = _texts(rng, 600 * n_views)
    want = b"".join(
        hashlib.blake2b("\x1f".join(texts[i : i + n_views]).encode(), digest_size=8).digest()
        for i in range(0, len(texts), n_views)
    )
    assert native.split_digests(texts, n_views) == want
    assert native.split_digests(tuple(texts), n_views) == want
    assert native.split_digests([], n_views) == b""
    big = ["x" * (1 << 20) + "é", "y"]  # many blocks
    assert (
        native.split_digests(big, 2)[:8]
        == hashlib.blake2b("\x1f".join(big).encode(), digest_size=8).digest()
    )


@needs_native
def test_split_digests_refuse_what_python_refuses():
    with pytest.raises(UnicodeEncodeError):
        native.split_digests(["ok", "a\ud800b"], 1)  # a lone surrogate has no UTF-8
    with pytest.raises(TypeError, match="text 1 is a bytes"):
        native.split_digests(["ok", b"bytes"], 1)
    with pytest.raises(ValueError, match="3 texts are not records of 2 views"):
        native.split_digests(["a", "b", "c"], 2)
    with pytest.raises(TypeError):
        native.split_digests(5, 1)


@needs_native
@pytest.mark.parametrize("dtype", ["<u2", "<u4"])
def test_record_crcs_are_zlib_crc32_of_each_record(dtype):
    rng = np.random.default_rng(0)
    for _ in range(40):
        tokens = rng.integers(0, 60_000, int(rng.integers(0, 3000))).astype(dtype)
        ends = np.sort(rng.integers(0, len(tokens) + 1, int(rng.integers(0, 30))))
        ends = np.append(ends, len(tokens)).astype(np.int64) * tokens.itemsize  # empty records too
        raw, starts = tokens.tobytes(), np.concatenate(([0], ends[:-1]))
        want = [zlib.crc32(raw[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]
        assert np.frombuffer(native.record_crcs(tokens, ends), "<u4").tolist() == want


@needs_native
def test_record_crcs_refuse_bad_ends():
    data = np.arange(10, dtype="<u2")
    for ends, match in (([4, 2], "record 1 ends at byte 2"), ([4, 21], "record 1 ends at byte 21")):
        with pytest.raises(ValueError, match=match):
            native.record_crcs(data, np.array(ends, np.int64))
    with pytest.raises(ValueError, match="not a buffer of int64"):
        native.record_crcs(data, b"\x00" * 12)


@needs_native
def test_preprocessing_writes_the_same_bytes_in_c_and_in_python(
    tmp_path, tokenizer_dir, monkeypatch, capsys
):
    lines = (BUNDLED / "train.jsonl").read_text().splitlines()
    corpus = write_jsonl(tmp_path / "in.jsonl", lines)
    kw = dict(shard_bytes=300_000, max_record_tokens=200, val_fraction=0.2)
    calls = []

    def counted(f):
        return lambda *args: calls.append(f.__name__) or f(*args)

    names = ("split_digests", "record_crcs", "messages_views", "field_views")
    spy = SimpleNamespace(**{name: counted(getattr(native, name)) for name in names})
    modules = (pre, shard_io, sources)
    with monkeypatch.context() as m:
        for module in modules:
            m.setattr(module, "native", spy)
        in_c = run(corpus, tmp_path / "c", tokenizer_dir, **kw)
    assert set(calls) == {"split_digests", "record_crcs", "messages_views"}
    assert "not built" not in capsys.readouterr().err
    for module in modules:
        monkeypatch.setattr(module, "native", None)
    monkeypatch.delenv("LLM_JEPA_PURE_PYTHON", raising=False)
    assert run(corpus, tmp_path / "python", tokenizer_dir, **kw) == in_c
    assert "data_pipeline/_native.c is not built" in capsys.readouterr().err  # said, not silent
    assert in_c["splits"]["val"]["records"] > 0
    assert_same_files(tmp_path / "c", tmp_path / "python")


@needs_native
@pytest.mark.parametrize("system_prompt", ["drop", "prefix"])
def test_messages_views_are_the_python_views(monkeypatch, system_prompt):
    """Random chat records (roles repeated or missing, blank contents, up to 10 messages): per
    record and per block, the C views are ViewSpec._messages_block's."""

    spec = sources.ViewSpec.parse("messages", system_prompt)
    decode = sources._block_decoder("messages", ()).decode
    rng = random.Random(0)
    roles, contents = ["user", "assistant", "system", "tool", "é"], ["", " ", "\u3000", "x", "é y"]
    records = [
        decode(json.dumps({"messages": [
            {"role": rng.choice(roles), "content": rng.choice(contents)}
            for _ in range(rng.choice([0, 1, 2, 2, 3, 3, 3, 4, 9, 10]))]}))
        for _ in range(3000)
    ]  # fmt: skip
    in_c = [native.messages_views([r], system_prompt == "prefix") for r in records]
    monkeypatch.setattr(sources, "native", None)
    in_python = [spec._messages_block([r]) for r in records]
    many = [len(r.messages) > 8 for r in records]  # (left to the record-by-record path in C)
    assert [c for c, m in zip(in_c, many) if not m] == [p for p, m in zip(in_python, many) if not m]
    assert all(c is None for c, m in zip(in_c, many) if m)
    assert sum(c is not None for c in in_c) > 20
    good = [r for r, c in zip(records, in_c) if c is not None]
    assert native.messages_views(good, system_prompt == "prefix") == spec._messages_block(good)


@needs_native
def test_field_views_are_the_python_views(monkeypatch):
    """Named fields of decoded records: C and Python give the same views, or both None (a blank
    view anywhere in the block); a value that is not a string gives None, a missing one raises."""

    spec = sources.ViewSpec.parse("q,a-b")
    decode = sources._block_decoder(spec.mode, spec.fields).decode
    rng = random.Random(1)
    values = ["x", "é y", "", " ", "\u3000", "a\u3000"]
    for _ in range(300):
        lines = b"\n".join(
            json.dumps({"q": rng.choice(values), "a-b": rng.choice(values)}).encode()
            for _ in range(rng.randint(1, 5))
        )
        with monkeypatch.context() as m:
            m.setattr(sources, "native", None)
            in_python = spec.extract_block(lines)
        assert spec.extract_block(lines) == in_python
    records = [decode(b'{"q": "1", "a-b": "2"}')] * 3
    assert native.field_views(records, ("f0", "f1")) == ["1", "2"] * 3
    assert native.field_views([SimpleNamespace(f0="x", f1=5)], ("f0", "f1")) is None
    with pytest.raises(AttributeError):
        native.field_views([SimpleNamespace(f0="x")], ("f0", "f1"))
