"""Token shards: a `.bin` of raw little-endian token ids and an `.idx` of record boundaries.

Both files start with a fixed 32-byte header; the reader checks magic, version and that the file
size matches what the header promises, so a truncated or padded file is refused before use.
Format spec: data_pipeline/README.md ("Shard format").
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

BIN_MAGIC = b"JEPATOK\x00"
IDX_MAGIC = b"JEPAIDX\x00"
VERSION = 1
HEADER_BYTES = 32
# magic (8s), version (u32), dtype code / n_views (u32), count (u64), count (u64)
_HEADER = struct.Struct("<8sIIQQ")
assert _HEADER.size == HEADER_BYTES

DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


class ShardError(ValueError):
    """A shard file is missing, corrupt or inconsistent; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return DTYPE_CODES[1] if vocab_size <= 2**16 else DTYPE_CODES[2]


def dtype_code(dtype: np.dtype) -> int:
    for code, dt in DTYPE_CODES.items():
        if dt == np.dtype(dtype):
            return code
    raise ValueError(f"unsupported token dtype {dtype}")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def fsync_rename(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Atomic publish: the data is on disk before the name appears."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Streams records into `<prefix>.bin` / `<prefix>.idx` under temporary names.

    Only the token stream goes to disk as it arrives; the index (8 + 4·n_views bytes per record)
    stays in memory until `close()`, which writes headers, fsyncs and renames both files.
    """

    def __init__(self, prefix: str | os.PathLike, n_views: int, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.n_views = n_views
        self.dtype = np.dtype(dtype)
        self._tmp_bin = f"{self.prefix}.bin.tmp{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")
        self._bin.write(b"\x00" * HEADER_BYTES)  # header is written last, when counts are known
        self._offsets: list[int] = []
        self._lengths: list[list[int]] = []
        self.n_tokens = 0
        self.view_tokens = [0] * n_views

    def add(self, views: list[list[int]]) -> None:
        if len(views) != self.n_views:
            raise ValueError(f"expected {self.n_views} views, got {len(views)}")
        self._offsets.append(self.n_tokens)
        lengths = [len(v) for v in views]
        self._lengths.append(lengths)
        flat = np.fromiter((t for v in views for t in v), dtype=self.dtype, count=sum(lengths))
        self._bin.write(flat.tobytes())
        self.n_tokens += flat.size
        for j, n in enumerate(lengths):
            self.view_tokens[j] += n

    @property
    def n_records(self) -> int:
        return len(self._offsets)

    def close(self) -> None:
        self._bin.seek(0)
        self._bin.write(_HEADER.pack(BIN_MAGIC, VERSION, dtype_code(self.dtype), self.n_tokens, 0))
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        offsets = np.asarray(self._offsets, dtype="<u8")
        lengths = np.asarray(self._lengths, dtype="<u4").reshape(-1, self.n_views)
        header = _HEADER.pack(IDX_MAGIC, VERSION, self.n_views, self.n_records, self.n_tokens)
        write_atomic(f"{self.prefix}.idx.tmp", header + offsets.tobytes() + lengths.tobytes())
        os.replace(f"{self.prefix}.idx.tmp", f"{self.prefix}.idx")
        os.replace(self._tmp_bin, f"{self.prefix}.bin")

    def abort(self) -> None:
        self._bin.close()
        Path(self._tmp_bin).unlink(missing_ok=True)


def read_header(path: str | os.PathLike, magic: bytes) -> tuple[int, int, int, int]:
    """Returns (code, count_a, count_b, file_size) after checking magic and version."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: file is missing")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated ({size} bytes, header needs {HEADER_BYTES})")
    with open(path, "rb") as f:
        got_magic, version, code, a, b = _HEADER.unpack(f.read(HEADER_BYTES))
    if got_magic != magic:
        raise ShardError(f"{path}: bad magic {got_magic!r}, expected {magic!r}")
    if version != VERSION:
        raise ShardError(f"{path}: format version {version}, this reader knows {VERSION}")
    return code, a, b, size


class ShardReader:
    """Read-only view of one shard. Memory maps are opened lazily, so instances pickle cheaply."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        code, n_tokens, _, bin_size = read_header(f"{self.prefix}.bin", BIN_MAGIC)
        if code not in DTYPE_CODES:
            raise ShardError(f"{self.prefix}.bin: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        expected = HEADER_BYTES + n_tokens * self.dtype.itemsize
        if bin_size != expected:
            raise ShardError(
                f"{self.prefix}.bin: size {bin_size} bytes, header promises {expected} "
                f"({n_tokens} tokens): truncated or corrupt"
            )
        n_views, n_records, idx_tokens, idx_size = read_header(f"{self.prefix}.idx", IDX_MAGIC)
        expected = HEADER_BYTES + n_records * (8 + 4 * n_views)
        if idx_size != expected:
            raise ShardError(
                f"{self.prefix}.idx: size {idx_size} bytes, header promises {expected}: "
                "truncated or corrupt"
            )
        if idx_tokens != n_tokens:
            raise ShardError(
                f"{self.prefix}.idx: indexes {idx_tokens} tokens but {self.prefix}.bin holds "
                f"{n_tokens}"
            )
        self.n_tokens, self.n_records, self.n_views = n_tokens, n_records, n_views
        self._tokens = self._offsets = self._lengths = None

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None, "_offsets": None, "_lengths": None}

    def _open(self) -> None:
        self._tokens = np.memmap(
            f"{self.prefix}.bin", dtype=self.dtype, mode="r", offset=HEADER_BYTES,
            shape=(self.n_tokens,),
        )  # fmt: skip
        idx = np.memmap(f"{self.prefix}.idx", dtype=np.uint8, mode="r", offset=HEADER_BYTES)
        off_bytes = self.n_records * 8
        self._offsets = idx[:off_bytes].view("<u8")
        self._lengths = idx[off_bytes:].view("<u4").reshape(self.n_records, self.n_views)

    @property
    def view_lengths(self) -> np.ndarray:
        """(n_records, n_views) uint32."""
        if self._lengths is None:
            self._open()
        return self._lengths

    def __len__(self) -> int:
        return self.n_records

    def record(self, i: int) -> list[np.ndarray]:
        """The views of record i, each a 1-D int64 array."""
        if self._tokens is None:
            self._open()
        start = int(self._offsets[i])
        views = []
        for n in self._lengths[i]:
            views.append(np.asarray(self._tokens[start : start + int(n)], dtype=np.int64))
            start += int(n)
        return views
