"""Token shards: a `.bin` of raw little-endian token ids and an `.idx` of record boundaries.

Both files start with a fixed header; the reader checks magic, version and that the file size
matches what the header promises, so a truncated or padded file is refused before use.
`check_index` proves in one vectorised pass that the records tile the `.bin` exactly. The index
(format 2) also holds the largest token id, checked against the vocabulary at start, and a CRC32
of every record's bytes, checked when the record is read: the cost follows the data read.
Format spec: data_pipeline/README.md ("Shard format").
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_pipeline.native import native

BIN_MAGIC = b"JEPATOK\x00"
IDX_MAGIC = b"JEPAIDX\x00"
BIN_VERSION = 1
IDX_VERSION = 2  # 1 (still read): no max token id, no record CRCs
HEADER_BYTES = 32
# magic (8s), version (u32), dtype code / n_views (u32), count (u64), count (u64)
_HEADER = struct.Struct("<8sIIQQ")
assert _HEADER.size == HEADER_BYTES
_MAX_ID = struct.Struct("<Q")  # index format 2: the largest token id follows the common header
IDX_HEADER_BYTES = {1: HEADER_BYTES, 2: HEADER_BYTES + _MAX_ID.size}
_HEAD_BYTES = max(IDX_HEADER_BYTES.values())  # a file's first bytes, enough for either header

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

    Only the token stream goes to disk as it arrives; the index (12 + 4·n_views bytes per record:
    offset, view lengths, CRC32) stays in memory, as numpy arrays, until `close()`, which writes
    headers, fsyncs (unless `fsync=False`: a part that is merged later) and renames both files.
    Records come one at a time (`add`), a batch at a time as flat arrays (`add_batch`: no Python
    work per token), or as every record of another shard (`append_shard`: merging parts).
    """

    def __init__(self, prefix: str | os.PathLike, n_views: int, dtype: np.dtype,
                 fsync: bool = True):  # fmt: skip
        self.prefix = Path(prefix)
        self.n_views = n_views
        self.dtype = np.dtype(dtype)
        self.fsync = fsync
        self._tmp_bin = f"{self.prefix}.bin.tmp{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")
        self._bin.write(b"\x00" * HEADER_BYTES)  # header is written last, when counts are known
        self._offsets: list[np.ndarray] = []  # (records,) <u8 per batch
        self._lengths: list[np.ndarray] = []  # (records, n_views) <u4 per batch
        self._crcs: list[np.ndarray] = []  # (records,) <u4 per batch
        self.n_records = 0
        self.n_tokens = 0
        self.max_token_id = 0
        self.view_tokens = [0] * n_views

    def add(self, views: list[list[int]]) -> None:
        if len(views) != self.n_views:
            raise ValueError(f"expected {self.n_views} views, got {len(views)}")
        lengths = [len(v) for v in views]
        flat = np.fromiter(itertools.chain.from_iterable(views), dtype=np.int64,
                           count=sum(lengths))  # fmt: skip
        self.add_batch(flat, np.asarray([lengths]))

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Records back to back: `tokens` (sum of lengths,) ids of any integer dtype, `lengths`
        (records, n_views) the tokens of each view. One write and one CRC32 per record."""
        lengths = np.asarray(lengths, dtype="<u4").reshape(-1, self.n_views)
        sizes = lengths.sum(axis=1, dtype=np.uint64)  # (records,)
        if int(sizes.sum()) != len(tokens):
            raise ValueError(f"views hold {int(sizes.sum())} tokens, got {len(tokens)}")
        if len(tokens):
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi > np.iinfo(self.dtype).max:
                raise ValueError(f"token id {hi if hi > 0 else lo} does not fit {self.dtype}")
            self.max_token_id = max(self.max_token_id, hi)
        data = np.ascontiguousarray(tokens, dtype=self.dtype)  # a copy only if the dtype differs
        ends = np.cumsum(sizes)
        self._append_index(ends - sizes, lengths, _record_crcs(data, ends))
        self._bin.write(memoryview(data).cast("B"))
        self.n_tokens += len(data)

    def append_shard(self, prefix: str | os.PathLike) -> None:
        """Appends every record of the shard at `prefix` (same n_views and dtype), copying its
        tokens and index as they are: the record CRCs stay valid (they cover the bytes only)."""
        part = ShardReader(prefix)
        if (part.n_views, part.dtype) != (self.n_views, self.dtype) or not part.has_checksums:
            raise ValueError(f"{prefix}: {part.n_views} views of {part.dtype}, index version "
                             f"{part.index_version}; this shard has {self.n_views} views of "
                             f"{self.dtype}, index version {IDX_VERSION}")  # fmt: skip
        part.check_index()  # the records tile its .bin: the copied offsets stay right
        maps = part._maps()
        try:
            for lo in range(0, part.n_tokens, 1 << 22):  # 4 Mi tokens at a time
                self._bin.write(memoryview(maps.tokens[lo : lo + (1 << 22)]).cast("B"))
            self._append_index(np.array(maps.offsets), np.array(maps.lengths), np.array(maps.crcs))
        finally:
            del maps
            part.close()
        self.max_token_id = max(self.max_token_id, part.max_token_id)
        self.n_tokens += part.n_tokens

    def _append_index(self, offsets: np.ndarray, lengths: np.ndarray, crcs: np.ndarray) -> None:
        """offsets: relative to the batch's first token."""
        self._offsets.append(offsets.astype("<u8") + np.uint64(self.n_tokens))
        self._lengths.append(lengths.astype("<u4", copy=False))
        self._crcs.append(crcs.astype("<u4", copy=False))
        self.n_records += len(offsets)
        for j, n in enumerate(lengths.sum(axis=0, dtype=np.uint64).tolist()):
            self.view_tokens[j] += n

    def close(self) -> None:
        self._bin.seek(0)
        self._bin.write(
            _HEADER.pack(BIN_MAGIC, BIN_VERSION, dtype_code(self.dtype), self.n_tokens, 0)
        )
        self._bin.flush()
        if self.fsync:
            os.fsync(self._bin.fileno())
        self._bin.close()

        def joined(chunks: list[np.ndarray], dtype: str) -> bytes:
            return np.concatenate(chunks).astype(dtype, copy=False).tobytes() if chunks else b""

        header = _HEADER.pack(IDX_MAGIC, IDX_VERSION, self.n_views, self.n_records, self.n_tokens)
        header += _MAX_ID.pack(self.max_token_id)
        body = (
            joined(self._offsets, "<u8") + joined(self._lengths, "<u4") + joined(self._crcs, "<u4")
        )
        if self.fsync:
            write_atomic(f"{self.prefix}.idx.tmp", header + body)
        else:
            with open(f"{self.prefix}.idx.tmp", "wb") as f:
                f.write(header + body)
        os.replace(f"{self.prefix}.idx.tmp", f"{self.prefix}.idx")
        os.replace(self._tmp_bin, f"{self.prefix}.bin")

    def abort(self) -> None:
        self._bin.close()
        Path(self._tmp_bin).unlink(missing_ok=True)


def _record_crcs(tokens: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """CRC32 of each record's bytes; records lie back to back in `tokens`, record i ending at
    token ends[i] (the first starting at 0). In C where built (data_pipeline/_native.c), else
    one zlib call per record, on views (no copies), chained in C by map."""
    tokens = np.ascontiguousarray(tokens)
    ends = ends.astype(np.int64) * tokens.dtype.itemsize
    if native is not None:
        return np.frombuffer(native.record_crcs(tokens, ends), "<u4")
    raw = memoryview(tokens).cast("B")
    starts = np.concatenate(([0], ends[:-1])).tolist()
    records = map(raw.__getitem__, map(slice, starts, ends.tolist()))
    return np.fromiter(map(zlib.crc32, records), dtype="<u4", count=len(ends))


def _read_head(path: str | os.PathLike) -> tuple[bytes, int]:
    """A file's first bytes (enough for either header) and its size: one open, one fstat."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardError(f"{path}: file is missing") from None
    try:
        return os.pread(fd, _HEAD_BYTES, 0), os.fstat(fd).st_size
    finally:
        os.close(fd)


def _check_header(
    path: str | os.PathLike, head: bytes, size: int, magic: bytes, versions: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """(version, code, count_a, count_b) from a file's first bytes and its size (read or mapped),
    after checking the size, magic and version."""
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated ({size} bytes, header needs {HEADER_BYTES})")
    got_magic, version, code, a, b = _HEADER.unpack_from(head)
    if got_magic != magic:
        raise ShardError(f"{path}: bad magic {got_magic!r}, expected {magic!r}")
    if version not in versions:
        raise ShardError(f"{path}: format version {version}, this reader knows {versions}")
    return version, code, a, b


# Open shards per process, whatever the number of shards: the least recently read is closed when
# one more opens (it reopens when read again). The global shuffle reads a random shard per record,
# so a bound below the shard count S misses 1 - bound/S of the reads, and a miss (two maps opened)
# costs ~10x a hit: the bound is as large as the process's limits allow (open_readers_limit).
MAX_OPEN_READERS: int | None = None  # an int fixes the bound (tests, benchmarks)
MIN_OPEN_READERS = 16
FDS_PER_SHARD = 2  # one per map: CPython's mmap keeps a dup() of the file's descriptor
MAPS_PER_SHARD = 2  # kernel map areas (vm.max_map_count counts them per process)
_derived_limit: int | None = None  # open_readers_limit's, computed at first use
_open_readers: OrderedDict[int, ShardReader] = OrderedDict()
_open_lock = threading.Lock()  # the prefetch thread and evaluation read concurrently


def open_readers() -> int:
    """Shards whose maps are open in this process (at most open_readers_limit())."""
    return len(_open_readers)


def open_readers_limit() -> int:
    """How many shards may hold their maps at once in this process: MAX_OPEN_READERS when set,
    else (computed once, at first use) what the limits leave: the soft RLIMIT_NOFILE, first
    raised to the hard limit (as training frameworks do), less a reserve for everything else
    (a quarter, at least 128 descriptors), and half of vm.max_map_count, each divided by what a
    shard holds; at least MIN_OPEN_READERS. `ulimit -n 256` gives 64; 1024 gives 384."""
    global _derived_limit
    if MAX_OPEN_READERS is not None:
        return MAX_OPEN_READERS
    if _derived_limit is None:
        soft = raise_open_file_limit()
        bound = (soft - max(128, soft // 4)) // FDS_PER_SHARD
        max_maps = _max_map_count()
        if max_maps is not None:
            bound = min(bound, max_maps // 2 // MAPS_PER_SHARD)
        _derived_limit = max(MIN_OPEN_READERS, bound)
    return _derived_limit


def raise_open_file_limit() -> int:
    """Raises this process's soft limit on open files to its hard limit; returns the soft limit
    in force (capped at 2^20: "unlimited" is not a count)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = 1 << 20
    target = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. macOS refuses more than OPEN_MAX
            pass
    return cap if soft == resource.RLIM_INFINITY else min(soft, cap)


def _max_map_count() -> int | None:
    """Linux's per-process bound on memory map areas; None where there is none to read."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def _map_file(path: str, random_access: bool) -> np.ndarray:
    """The whole file, memory-mapped read-only: (size,) uint8, the header included. The map holds
    one descriptor (a dup() of the one opened here) until the last array over it goes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardError(f"{path}: file is missing") from None
    try:
        size = os.fstat(fd).st_size
        if not size:
            return np.zeros(0, np.uint8)  # mmap refuses an empty file
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=np.uint8)


class _Layout(NamedTuple):
    """What a shard's headers say (or, until they are read, its manifest entry)."""

    dtype: np.dtype
    n_tokens: int
    n_records: int
    n_views: int
    index_version: int
    max_token_id: int | None  # index format 2; None: format 1, or not read yet


def _index_bytes(version: int, n_records: int, n_views: int) -> int:
    """The size of an .idx of this format: header, offsets, view lengths, CRC32s (format 2)."""
    return IDX_HEADER_BYTES[version] + n_records * (8 + 4 * n_views + 4 * (version >= 2))


def _check_bin(prefix: Path, head: bytes, size: int) -> tuple[np.dtype, int]:
    """The .bin's header against its size: (dtype, tokens)."""
    _, code, n_tokens, _ = _check_header(f"{prefix}.bin", head, size, BIN_MAGIC, (1,))
    if code not in DTYPE_CODES:
        raise ShardError(f"{prefix}.bin: unknown dtype code {code}")
    dtype = DTYPE_CODES[code]
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if size != expected:
        raise ShardError(
            f"{prefix}.bin: size {size} bytes, header promises {expected} "
            f"({n_tokens} tokens): truncated or corrupt"
        )
    return dtype, n_tokens


def _check_idx(prefix: Path, head: bytes, size: int, dtype: np.dtype, n_tokens: int) -> _Layout:
    """The .idx's header against its size and the .bin's token count."""
    version, n_views, n_records, idx_tokens = _check_header(
        f"{prefix}.idx", head, size, IDX_MAGIC, tuple(IDX_HEADER_BYTES)
    )
    expected = _index_bytes(version, n_records, n_views)
    if size != expected:
        raise ShardError(
            f"{prefix}.idx: size {size} bytes, header promises {expected}: truncated or corrupt"
        )
    if idx_tokens != n_tokens:
        raise ShardError(
            f"{prefix}.idx: indexes {idx_tokens} tokens but {prefix}.bin holds {n_tokens}"
        )
    max_id = _MAX_ID.unpack_from(head, HEADER_BYTES)[0] if version >= 2 else None
    return _Layout(dtype, n_tokens, n_records, n_views, version, max_id)


class _Maps(NamedTuple):
    tokens: np.ndarray  # (n_tokens,)
    offsets: np.ndarray  # (n_records,) <u8
    lengths: np.ndarray  # (n_records, n_views) <u4
    crcs: np.ndarray | None  # (n_records,) <u4, index format 2


class ShardReader:
    """Read-only view of one shard. Memory maps are opened lazily, so instances pickle cheaply,
    and at most open_readers_limit() shards hold them at a time (least recently read closed
    first). The constructor reads and checks both headers (`from_manifest` defers that to the
    first map open); `check_index` reads the whole index, `record` one record.

    vocab_size: token ids must lie below it; checked at open against the index's largest id
    (format 2) or, for format 1 indexes, over each record as it is read.
    random_access: records are read in a random order (the dataset's shuffle); the .bin's map
    is advised so (MADV_RANDOM): a page fault then reads that page, not the readahead window
    around it (up to read_ahead_kb: ~110 KB from disk per 68-byte record measured at 10^8
    records). The .idx keeps readahead: a record's entry lies in three columns (offsets,
    lengths, CRCs), so page by page it costs three faults per record read cold (2.6 against
    0.9 measured), and it is small (20 bytes a record) and read whole by the start-up checks.
    In-order readers (verification, checksums, merging) keep readahead."""

    def __init__(
        self, prefix: str | os.PathLike, vocab_size: int | None = None, random_access: bool = False
    ):
        self.prefix = Path(prefix)
        self.vocab_size, self.random_access = vocab_size, random_access
        self._open_maps: _Maps | None = None
        dtype, n_tokens = _check_bin(self.prefix, *_read_head(f"{self.prefix}.bin"))
        head, size = _read_head(f"{self.prefix}.idx")
        self._adopt(_check_idx(self.prefix, head, size, dtype, n_tokens))
        self._unchecked = False  # the headers were read and checked

    @classmethod
    def from_manifest(
        cls, prefix: str | os.PathLike, entry: dict, n_views: int, dtype: np.dtype,
        vocab_size: int | None = None, random_access: bool = False,
    ) -> ShardReader:  # fmt: skip
        """A reader that touches no file: its counts are the manifest entry's (records, tokens;
        the index format follows from idx_bytes), dtype and views the manifest's settings. Its
        headers are read and checked, as the constructor checks them and against these counts,
        when its maps first open: a one-line ShardError naming the file. (Reading every header
        at start cost each rank 3 opens and 7 stats per shard: at 10^9 records on 1,000 ranks,
        ~10^9 metadata calls on a shared file system.)"""
        self = cls.__new__(cls)
        self.prefix = Path(prefix)
        self.vocab_size, self.random_access = vocab_size, random_access
        self._open_maps = None
        records = int(entry["records"])
        versions = [v for v in IDX_HEADER_BYTES
                    if _index_bytes(v, records, n_views) == entry["idx_bytes"]]  # fmt: skip
        version = versions[0] if versions else IDX_VERSION  # else the check at open says why
        self._adopt(_Layout(np.dtype(dtype), int(entry["tokens"]), records, n_views, version, None))
        self._unchecked = True
        return self

    def _adopt(self, layout: _Layout) -> None:
        """Takes the shard's layout; checks its largest token id against the vocabulary."""
        self.dtype, self.n_tokens, self.n_records = layout.dtype, layout.n_tokens, layout.n_records
        self.n_views, self.index_version = layout.n_views, layout.index_version
        self.has_checksums = layout.index_version >= 2
        self.max_token_id = layout.max_token_id
        known = self.vocab_size is not None and self.max_token_id is not None
        if known and self.max_token_id >= self.vocab_size:
            raise ShardError(
                f"{self.prefix}.idx: token ids up to {self.max_token_id}, but the vocabulary has "
                f"{self.vocab_size} tokens: written with another tokenizer, or corrupt"
            )

    def _check_mapped(self, data: np.ndarray, idx: np.ndarray) -> None:
        """from_manifest's deferred checks, on the mapped files' first bytes: the headers as the
        constructor checks them, then against the manifest's counts."""
        said = self._layout()
        dtype, n_tokens = _check_bin(self.prefix, bytes(data[:_HEAD_BYTES]), data.size)
        held = _check_idx(self.prefix, bytes(idx[:_HEAD_BYTES]), idx.size, dtype, n_tokens)
        if held[:5] != said[:5]:  # all but max_token_id, which the manifest does not hold
            raise ShardError(
                f"{self.prefix}: holds {held.n_records} records / {held.n_tokens} tokens / "
                f"{held.n_views} views of {held.dtype} (index format {held.index_version}), "
                f"manifest says {said.n_records} / {said.n_tokens} / {said.n_views} of "
                f"{said.dtype} (format {said.index_version}): the files changed or are corrupt"
            )
        self._adopt(held)
        self._unchecked = False

    def _layout(self) -> _Layout:
        return _Layout(self.dtype, self.n_tokens, self.n_records, self.n_views,
                       self.index_version, self.max_token_id)  # fmt: skip

    def __getstate__(self):
        return {**self.__dict__, "_open_maps": None}

    def _maps(self) -> _Maps:
        """The maps, opened if needed; marks this shard the most recently read and closes the
        least recently read one beyond open_readers_limit(). A caller's references keep a closed
        shard's maps alive until it lets go of them."""
        with _open_lock:
            maps = self._open_maps
            if maps is None:
                maps = self._open_maps = self._map_files()
            _open_readers[id(self)] = self
            _open_readers.move_to_end(id(self))
            limit = open_readers_limit()
            while len(_open_readers) > limit:
                _, oldest = _open_readers.popitem(last=False)
                oldest._open_maps = None  # the last reference: the maps and their files close
        return maps

    def close(self) -> None:
        with _open_lock:
            _open_readers.pop(id(self), None)
            self._open_maps = None

    def _map_files(self) -> _Maps:
        # Plain ndarrays over the maps: slicing an np.memmap costs ~3 µs more per slice.
        data = _map_file(f"{self.prefix}.bin", self.random_access)
        idx = _map_file(f"{self.prefix}.idx", random_access=False)  # see the class docstring
        if self._unchecked:
            self._check_mapped(data, idx)
        tokens = data[HEADER_BYTES : HEADER_BYTES + self.n_tokens * self.dtype.itemsize]
        tokens = tokens.view(self.dtype)
        idx = idx[IDX_HEADER_BYTES[self.index_version] :]
        off_bytes, len_bytes = self.n_records * 8, self.n_records * 4 * self.n_views
        lengths = idx[off_bytes : off_bytes + len_bytes].view("<u4")
        crcs = idx[off_bytes + len_bytes :].view("<u4") if self.has_checksums else None
        return _Maps(tokens, idx[:off_bytes].view("<u8"),
                     lengths.reshape(self.n_records, self.n_views), crcs)  # fmt: skip

    @property
    def view_lengths(self) -> np.ndarray:
        """(n_records, n_views) uint32."""
        return self._maps().lengths

    def __len__(self) -> int:
        return self.n_records

    def check_index(self, chunk_records: int = 1 << 20) -> list[int]:
        """Proves that the records tile the .bin: record 0 starts at token 0, each next one where
        the one before ends, the last ends at n_tokens. So every record lies inside the file and
        no two overlap. One vectorised pass over the index, chunk by chunk (bounded memory).
        Returns the tokens per view, summed over the records. A one-off pass: maps it opens are
        closed when it returns, not kept in the reader LRU."""
        view_tokens = [0] * self.n_views
        end = 0
        maps = self._open_maps or self._map_files()
        for lo in range(0, self.n_records, chunk_records):
            lengths = maps.lengths[lo : lo + chunk_records]
            # Column by column: numpy's sum over a short last axis is ~10x slower.
            sizes = lengths[:, 0].astype(np.uint64)
            for j in range(1, self.n_views):
                sizes += lengths[:, j]
            starts = np.cumsum(sizes)
            starts -= sizes
            starts += np.uint64(end)  # where each record must start
            bad = np.flatnonzero(maps.offsets[lo : lo + chunk_records] != starts)
            if bad.size:
                i = int(bad[0])
                start = int(maps.offsets[lo + i])
                stop = start + int(sizes[i])
                if stop > self.n_tokens:
                    raise ShardError(self._past_end(lo + i, start, stop))
                raise ShardError(
                    f"{self.prefix}.idx: record {lo + i} starts at token {start}, but the "
                    f"records before it end at {int(starts[i])}"
                )
            for j in range(self.n_views):
                view_tokens[j] += int(lengths[:, j].sum(dtype=np.uint64))
            end = int(starts[-1] + sizes[-1])
        if end != self.n_tokens:
            raise ShardError(
                f"{self.prefix}.idx: its records hold {end} tokens, {self.prefix}.bin "
                f"{self.n_tokens}"
            )
        return view_tokens

    def _past_end(self, i: int, start: int, stop: int) -> str:
        return (
            f"{self.prefix}.idx: record {i} spans tokens {start}..{stop}, past the end of "
            f"{self.prefix}.bin ({self.n_tokens} tokens)"
        )

    def record(self, i: int) -> list[np.ndarray]:
        """The views of record i, each a 1-D int64 array. Its bytes are checked against the
        record's CRC32 (index format 2; one crc32 over the bytes read anyway), or its ids against
        the vocabulary (format 1)."""
        maps = self._maps()
        start, lengths = int(maps.offsets[i]), maps.lengths[i].tolist()
        end = start + sum(lengths)
        if end > self.n_tokens:  # check_index rules this out for the whole shard at start
            raise ShardError(self._past_end(i, start, end))
        tokens = maps.tokens[start:end]
        if maps.crcs is not None:
            if zlib.crc32(tokens) != maps.crcs[i]:
                raise ShardError(
                    f"{self.prefix}.bin: record {i} (tokens {start}..{end}) does not match its "
                    f"CRC32 in {self.prefix}.idx: the file changed or is corrupt"
                )
        elif self.vocab_size is not None and end > start and tokens.max() >= self.vocab_size:
            raise ShardError(
                f"{self.prefix}.bin: record {i} holds token id {int(tokens.max())}, but the "
                f"vocabulary has {self.vocab_size} tokens: written with another tokenizer, or "
                "corrupt"
            )
        flat, views = tokens.astype(np.int64), []
        for n in lengths:
            views.append(flat[:n])
            flat = flat[n:]
        return views
