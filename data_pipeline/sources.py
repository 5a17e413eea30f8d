"""Reading raw inputs: file discovery, work units, streaming record readers, view extraction.

Inputs are JSONL (plain or .gz), Parquet, and `datasets` folders written by `save_to_disk`. Every
reader streams: a work unit covers a byte range of a JSONL file, a run of Parquet row groups, or a
row range of a datasets folder, so memory does not grow with the size of the input.
"""

from __future__ import annotations

import functools
import glob
import gzip
import itertools
import json
import os
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from operator import attrgetter
from pathlib import Path

import msgspec

from data_pipeline.native import native
from data_pipeline.tokenizer import lone_surrogate

SKIP_REASONS = ("bad_json", "bad_utf8", "lone_surrogate", "bad_record", "missing_view",
                "empty_view", "too_long", "truncated_gzip", "bad_gzip", "truncated_zstd",
                "bad_zstd")  # fmt: skip
FILE_REASONS = ("truncated_gzip", "bad_gzip", "truncated_zstd", "bad_zstd")
_SCAN_FIRST, _SCAN_BLOCK = 4 << 10, 1 << 24  # reads while finding a line start: 4 KiB, growing
# msgspec's JSON decoder gives what json.loads gives for every document it accepts (big integers
# included, unlike orjson); what it refuses is parsed again by json.loads.
_decode_json = msgspec.json.Decoder().decode
BLOCK_BYTES = 1 << 20  # JSONL is read and checked a block of lines at a time
JSONL_KINDS = ("jsonl", "jsonl_gz", "jsonl_zst")


class InputError(ValueError):
    """Unusable input (no files, unknown format, bad --views); the message is one line."""


class SkipRecord(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    @property
    def ends_file(self) -> bool:
        """True for a damaged file: this one skip stands for the unreadable rest of it."""
        return self.reason in FILE_REASONS

    def describe(self, location: str) -> str:
        """The one-line form used in logs, manifests and --strict errors."""
        return f"{location}: {self.reason}: {self.detail}"


# ---------------------------------------------------------------------------------------------
# Files and work units


def input_kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_info.json").exists():
            return "hf_disk"
        raise InputError(f"{path}: a folder but not a `datasets` save_to_disk folder")
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl_gz"
    if name.endswith((".jsonl.zst", ".json.zst")):
        return "jsonl_zst"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise InputError(
        f"{path}: unknown input format (expected .jsonl, .jsonl.gz, .jsonl.zst, .parquet or a "
        "datasets folder)"
    )


def expand_inputs(inputs: str | list[str] | tuple[str, ...]) -> list[Path]:
    """Globs (a string, a comma-separated string, or a list) → sorted unique existing paths."""
    patterns = inputs.split(",") if isinstance(inputs, str) else list(inputs)
    paths: list[Path] = []
    for pattern in (p.strip() for p in patterns if p.strip()):
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise InputError(f"--inputs: {pattern!r} matches no file")
        paths.extend(Path(m) for m in matches)
    if not paths:
        raise InputError("--inputs: no input given")
    seen, unique = set(), []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


@dataclass(frozen=True)
class Unit:
    """A slice of one input file: a work unit, processed into one output shard (per split), or a
    part of one, processed by one worker (a unit's parts are consecutive and tile it)."""

    path: str
    kind: str
    start: int  # byte offset (jsonl) or first row (parquet row group index / datasets row)
    end: int  # exclusive
    # Line number of the unit's first line (jsonl): 1 at the start of a file; 0 (not counted)
    # past it, since planning reads no more than a line at each cut. A worker counts the lines
    # of what it reads, and the manifest numbers them (line numbers are resolved once every unit
    # before is done; see data_pipeline.preprocess.resolve_lines).
    first_line: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def where(self, index: int, first_line: int | None = None) -> str:
        """The location of the record at `index` (iter_records) for messages: `path:line` (or
        `path:row r`). first_line: the unit's first line when the plan did not count it; when
        nobody has, the line is named from the unit's first byte."""
        if self.kind in ("parquet", "hf_disk"):
            return f"{self.path}:row {index}"
        first = first_line or self.first_line
        if first:
            return f"{self.path}:{first + index}"
        return f"{self.path}: line {index + 1} from byte {self.start}"


def plan_units(paths: list[Path], shard_bytes: int) -> list[Unit]:
    """Deterministic cut of the inputs into units of about `shard_bytes` of raw input."""
    return [join_parts(parts) for parts in plan_parts(paths, shard_bytes, shard_bytes)]


def plan_parts(paths: list[Path], shard_bytes: int, part_bytes: int) -> list[list[Unit]]:
    """The units of plan_units(paths, shard_bytes), each cut into consecutive parts of about
    `part_bytes` (≤ shard_bytes) of raw input, so that workers can share a unit. The units do not
    depend on part_bytes: a JSONL unit ends at the first line start at or after each multiple of
    shard_bytes whatever the parts inside it. Compressed files are one part (a stream cannot
    seek); Parquet parts are runs of row groups. A JSONL file smaller than one part is not read."""
    part_bytes = max(1, min(part_bytes, shard_bytes))
    units: list[list[Unit]] = []
    for path in paths:
        kind = input_kind(path)
        if kind == "jsonl":
            units.extend(_plan_jsonl(path, shard_bytes, part_bytes))
        elif kind in ("jsonl_gz", "jsonl_zst"):  # a compressed stream: one unit per file
            units.append([Unit(str(path), kind, 0, path.stat().st_size)])
        elif kind == "parquet":
            units.extend(_plan_parquet(path, shard_bytes, part_bytes))
        else:
            units.extend(_plan_hf_disk(path, shard_bytes, part_bytes))
    return units


def join_parts(parts: list[Unit]) -> Unit:
    """The unit that consecutive parts of one file tile."""
    first = parts[0]
    return Unit(first.path, first.kind, first.start, parts[-1].end, first.first_line)


def line_start_at_or_after(f, target: int, size: int) -> int:
    """The offset of the first line start at or after `target` in the open file `f` (size if
    none): reads from target − 1 to the next newline, a few KiB for usual lines."""
    if target <= 0:
        return 0
    pos, block = target - 1, _SCAN_FIRST
    while pos < size:
        f.seek(pos)
        data = f.read(block)
        if (nl := data.find(b"\n")) >= 0:
            return pos + nl + 1
        pos, block = pos + len(data), min(block * 4, _SCAN_BLOCK)
        if not data:
            break
    return size


def line_number_at(path: str, offset: int) -> int:
    """The line number of the line starting at `offset` (counts every newline before it: one
    read of the file's beginning, for error messages only)."""
    lines = 1
    with open(path, "rb") as f:
        while offset > 0 and (data := f.read(min(_SCAN_BLOCK, offset))):
            lines += data.count(b"\n")
            offset -= len(data)
    return lines


def _plan_jsonl(path: Path, shard_bytes: int, part_bytes: int) -> list[list[Unit]]:
    """A unit ends at the first line start at or after each multiple of shard_bytes (counted
    from the previous unit's end when a line is longer than shard_bytes); inside a unit, a part
    at the first line start at or after each part_bytes from the part's start. Reads only around
    each cut (no pass over the file: lines are counted by the workers)."""
    size = path.stat().st_size
    units: list[list[Unit]] = []
    parts: list[Unit] = []
    start, next_unit = 0, shard_bytes

    def part(a: int, b: int) -> Unit:
        return Unit(str(path), "jsonl", a, b, 1 if a == 0 else 0)

    with open(path, "rb") as f:
        while (target := min(next_unit, start + part_bytes)) < size:  # (no read for one unit)
            if (cut := line_start_at_or_after(f, target, size)) >= size:
                break
            parts.append(part(start, cut))
            start = cut
            if cut >= next_unit:
                units.append(parts)
                parts = []
                next_unit = max(cut, next_unit) + shard_bytes
    parts.append(part(start, size))
    units.append(parts)
    return units


def _plan_parquet(path: Path, shard_bytes: int, part_bytes: int) -> list[list[Unit]]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    units: list[list[Unit]] = []
    parts: list[Unit] = []
    start, acc, part_acc = 0, 0, 0
    for g in range(meta.num_row_groups):
        size = meta.row_group(g).total_byte_size
        acc += size
        part_acc += size
        if part_acc >= part_bytes or acc >= shard_bytes:
            parts.append(Unit(str(path), "parquet", start, g + 1))
            start, part_acc = g + 1, 0
        if acc >= shard_bytes:
            units.append(parts)
            parts, acc = [], 0
    if start < meta.num_row_groups or not units:
        parts.append(Unit(str(path), "parquet", start, meta.num_row_groups))
    if parts:
        units.append(parts)
    return units


def _plan_hf_disk(path: Path, shard_bytes: int, part_bytes: int) -> list[list[Unit]]:
    import datasets

    ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow, nothing is read yet
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(f"{path}: a DatasetDict; pass one split's folder (e.g. {path}/train)")
    n = len(ds)
    total = sum(f.stat().st_size for f in path.glob("*.arrow")) or 1
    rows_per_unit = max(1, int(n * shard_bytes / total))
    rows_per_part = max(1, int(n * part_bytes / total))
    units = [[Unit(str(path), "hf_disk", p, min(end, p + rows_per_part))
              for p in range(s, end, rows_per_part)]
             for s in range(0, n, rows_per_unit) for end in [min(n, s + rows_per_unit)]]  # fmt: skip
    return units or [[Unit(str(path), "hf_disk", 0, 0)]]


# ---------------------------------------------------------------------------------------------
# Streaming records: (location, record dict) or (location, SkipRecord)


class Counted:
    """Iterates a generator and keeps what it returns (iter_records, iter_line_blocks: the
    number of lines they read)."""

    def __init__(self, gen):
        self.gen, self.lines = gen, 0

    def __iter__(self):
        self.lines = yield from self.gen


def iter_unit(unit: Unit) -> Iterator[tuple[str, dict | SkipRecord]]:
    """(location, record) of every record of the unit: iter_records, with locations named."""
    for index, record in iter_records(unit):
        yield unit.where(index), record


def iter_records(unit: Unit) -> Generator[tuple[int, dict | SkipRecord], None, int]:
    """(index, record) of every record of the unit; unit.where(index) names it. The index is the
    line's, counted from the unit's first line (JSONL), or the row's. Returns the number of lines
    read (JSONL; 0 otherwise), which numbers the lines of the units after it."""
    if unit.kind in JSONL_KINDS:
        blocks = Counted(iter_line_blocks(unit))
        for first, _, block in blocks:
            if isinstance(block, SkipRecord):
                yield first, block
            else:
                yield from parse_block(first, block)
        return blocks.lines
    yield from _iter_parquet(unit) if unit.kind == "parquet" else _iter_hf_disk(unit)
    return 0


def _parse_json_line(raw: bytes) -> dict | SkipRecord:
    try:
        record = _decode_json(raw)  # C, UTF-8 checked; ~1.5x the standard library's speed
    except ValueError:
        record = None  # refused: the standard library names the reason, or accepts what
        # msgspec does not (a lone surrogate escape, NaN, 1e400), as it always did
    if isinstance(record, dict):
        return record
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return SkipRecord("bad_utf8", f"byte {e.start}")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return SkipRecord("bad_json", e.msg)
    if not isinstance(record, dict):
        return SkipRecord("bad_record", f"a JSON {type(record).__name__}, not an object")
    return record


def parse_block(first: int, block: bytes) -> Iterator[tuple[int, dict | SkipRecord]]:
    """(index, record) of every line of a block (iter_line_blocks) that is not blank."""
    for index, raw in enumerate(block.split(b"\n"), first):
        if raw and not raw.isspace():
            yield index, _parse_json_line(raw)


def iter_line_blocks(unit: Unit) -> Generator[tuple[int, int, bytes | SkipRecord], None, int]:
    """The lines of a JSONL unit (plain, .gz or .zst), about BLOCK_BYTES at a time: (index of
    the block's first line, its number of lines, the block: whole lines, blank ones included,
    joined by newlines, without the last one's). A damaged compressed file ends with (index of
    the line after the last read, 0, SkipRecord): the lines before stay, the rest of the file
    is one counted skip. Returns the number of lines."""
    if unit.kind == "jsonl_gz":
        return (yield from _gzip_blocks(unit))
    if unit.kind == "jsonl_zst":
        return (yield from _zstd_blocks(unit))
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        return (yield from _numbered(_line_blocks(_chunks(f, unit.end - unit.start))))


def _chunks(f, size: int) -> Iterator[bytes]:
    """`size` bytes of f (fewer if it ends sooner), BLOCK_BYTES at a time."""
    while size > 0 and (chunk := f.read(min(BLOCK_BYTES, size))):
        size -= len(chunk)
        yield chunk


def _line_blocks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A byte stream as blocks of whole lines (iter_line_blocks), a chunk's worth at a time (a
    line longer than a chunk waits for its end, without copying it again per chunk); a last
    line without its newline comes last, alone."""
    pieces: list[bytes] = []  # a line not yet ended
    for chunk in chunks:
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            pieces.append(chunk)
            continue
        block = b"".join([*pieces, chunk[: cut - 1]])
        pieces = [chunk[cut:]] if cut < len(chunk) else []
        yield block
    if pieces:
        yield b"".join(pieces)


def _numbered(blocks: Iterator[bytes]) -> Generator[tuple[int, int, bytes], None, int]:
    """Blocks of lines as iter_line_blocks yields them (lines counted once, here)."""
    index = 0
    for block in blocks:
        lines = block.count(b"\n") + 1
        yield index, lines, block
        index += lines
    return index


def _gzip_blocks(unit: Unit) -> Generator[tuple[int, int, bytes | SkipRecord], None, int]:
    """Line by line (gzip's reader), so that damage keeps every line read before it."""
    index, lines, size = 0, [], 0
    with gzip.open(unit.path, "rb") as f:
        try:
            for raw in f:
                lines.append(raw)
                size += len(raw)
                if size >= BLOCK_BYTES:
                    yield index, len(lines), _join_lines(lines)
                    index, lines, size = index + len(lines), [], 0
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # only gzip raises these
            if lines:
                yield index, len(lines), _join_lines(lines)
            yield index + len(lines), 0, _gzip_damage(e)
            return index + len(lines)
    if lines:
        yield index, len(lines), _join_lines(lines)
    return index + len(lines)


def _join_lines(lines: list[bytes]) -> bytes:
    """Lines that keep their newlines (the last one's maybe not) as a block (iter_line_blocks)."""
    block = b"".join(lines)
    return block[:-1] if block.endswith(b"\n") else block


def _zstd_blocks(unit: Unit) -> Generator[tuple[int, int, bytes | SkipRecord], None, int]:
    """A zstd-compressed JSONL file (Dolma, The Pile), streamed: its frames one after the other."""
    import zstandard

    index = 0  # lines read
    try:
        for first, lines, block in _numbered(_line_blocks(_zstd_chunks(unit.path, zstandard))):
            yield first, lines, block
            index = first + lines
    except EOFError:
        why = "compressed data ends early (file cut short); the rest is lost"
        yield index, 0, SkipRecord("truncated_zstd", why)
        return index
    except zstandard.ZstdError as e:
        yield index, 0, SkipRecord("bad_zstd", f"{e}; the rest of the file is lost")
        return index
    return index


def _zstd_chunks(path: str, zstandard) -> Iterator[bytes]:
    """Decompressed bytes of every frame of `path`, 1 MiB of input at a time. EOFError when the
    data ends inside a frame (zstandard's stream reader would just stop there)."""
    dobj, inside = zstandard.ZstdDecompressor().decompressobj(), False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                out = dobj.decompress(chunk)
                inside = True
                if out:
                    yield out
                if dobj.eof:  # the frame is complete: what follows starts the next one
                    chunk = dobj.unused_data
                    dobj, inside = zstandard.ZstdDecompressor().decompressobj(), False
                else:
                    chunk = b""
    if inside:
        raise EOFError(f"{path}: zstd data ends inside a frame")


def _gzip_damage(e: Exception) -> SkipRecord:
    if isinstance(e, EOFError):  # "Compressed file ended before the end-of-stream marker ..."
        return SkipRecord(
            "truncated_gzip", "compressed data ends early (file cut short); the rest is lost"
        )
    return SkipRecord("bad_gzip", f"{e}; the rest of the file is lost")  # not gzip, or corrupt


def _iter_parquet(unit: Unit) -> Iterator[tuple[int, dict]]:
    for first, rows in iter_parquet_batches(unit):
        yield from parquet_rows(first, rows)


def iter_parquet_batches(unit: Unit, columns: tuple[str, ...] | None = None) -> Iterator[tuple]:
    """(index of its first row, pyarrow RecordBatch) of a Parquet unit, 1,024 rows at a time:
    every column, or those of `columns` the file has (all when it has none of them)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    if columns is not None:
        columns = [c for c in columns if c in pf.schema_arrow.names] or None
    row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
    for g in range(unit.start, unit.end):
        for rows in pf.iter_batches(batch_size=1024, row_groups=[g], columns=columns):
            yield row, rows
            row += rows.num_rows


def parquet_rows(first: int, rows) -> Iterator[tuple[int, dict]]:
    """(index, record) of every row of a batch (iter_parquet_batches)."""
    yield from enumerate(rows.to_pylist(), first)


def _iter_hf_disk(unit: Unit) -> Iterator[tuple[int, dict]]:
    import datasets

    ds = datasets.load_from_disk(unit.path)
    for start in range(unit.start, unit.end, 1024):
        batch = ds[start : min(unit.end, start + 1024)]
        names = list(batch)
        for i in range(len(batch[names[0]]) if names else 0):
            yield start + i, {n: batch[n][i] for n in names}


# ---------------------------------------------------------------------------------------------
# Views


@dataclass(frozen=True)
class ViewSpec:
    """How a record becomes views: `messages` (chat), `text` (one field), or named fields."""

    mode: str  # "messages" | "fields"
    fields: tuple[str, ...] = ()
    system_prompt: str = "drop"  # messages only: "drop" or "prefix" (prepended to the user view)

    @classmethod
    def parse(
        cls, views: str | list[str] | tuple[str, ...], system_prompt: str = "drop"
    ) -> ViewSpec:
        if system_prompt not in ("drop", "prefix"):
            raise InputError(f"--system_prompt must be 'drop' or 'prefix', got {system_prompt!r}")
        names = views.split(",") if isinstance(views, str) else list(views)
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise InputError("--views: give `messages`, `text`, or comma-separated field names")
        if names == ["messages"]:
            return cls("messages", ("user", "assistant"), system_prompt)
        if len(set(names)) != len(names):
            raise InputError(f"--views: a field is named twice in {names}")
        return cls("fields", tuple(names), system_prompt)

    @property
    def names(self) -> tuple[str, ...]:
        return self.fields

    def extract(self, record: dict) -> list[str]:
        """The record's views as strings, or SkipRecord(missing_view / empty_view / bad_record /
        lone_surrogate)."""
        views = self._extract_messages(record) if self.mode == "messages" else self._fields(record)
        for name, text in zip(self.names, views):
            if not text.isascii() and (why := lone_surrogate(text)):
                raise SkipRecord("lone_surrogate", f"view {name!r}: {why}")
        return views

    def extract_block(self, block: bytes, lines: int | None = None) -> list[str] | None:
        """The views of every line of a block (iter_line_blocks), len(names) per line back to
        back: what extract gives, record by record. None when some line is not a plain valid
        record (blank, not UTF-8 or not JSON, a view missing, not a string or empty, a repeated
        role): the caller then takes that block record by record, which names the reason. Typed
        decoding in C builds no dict and no Python frame per line."""
        try:
            if not block.isascii():
                block.decode("utf-8")  # the fields not decoded below are checked too
            records = _decode_lines(block, _block_decoder(self.mode, self.fields), lines)
        except (UnicodeDecodeError, msgspec.MsgspecError):
            return None
        if records is None:
            return None
        if self.mode == "messages":
            return self._messages_block(records)
        attrs = _block_attrs(len(self.fields))
        if native is not None:  # the same, in C (data_pipeline/_native.c)
            return native.field_views(records, attrs)
        views = list(map(attrgetter(*attrs), records))
        texts = views if len(attrs) == 1 else list(itertools.chain.from_iterable(views))
        return _none_if_blank(texts)  # (valid UTF-8 holds no lone surrogate)

    @property
    def columns(self) -> tuple[str, ...]:
        """The fields of a record that extract reads."""
        return ("messages",) if self.mode == "messages" else self.fields

    def extract_columns(self, rows) -> list[str] | None:
        """The views of every row of a pyarrow RecordBatch, as extract_block gives them for
        lines: named fields that are string columns without nulls, empty or blank values, one
        column conversion each. None otherwise (then row by row)."""
        import pyarrow as pa

        if self.mode != "fields" or any(f not in rows.schema.names for f in self.fields):
            return None
        columns = []
        for name in self.fields:
            column = rows.column(name)
            if column.null_count or not (
                pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            ):
                return None
            columns.append(column.to_pylist())
        texts = columns[0] if len(columns) == 1 else list(itertools.chain(*zip(*columns)))
        return _none_if_blank(texts)  # (UTF-8 from Arrow: no lone surrogate)

    def _messages_block(self, records: list) -> list[str] | None:
        """The user and assistant views of decoded chat records; None where a record repeats a
        role, lacks one of them, or a view is blank (the user one under a system prefix too)."""
        prefix = self.system_prompt == "prefix"
        if native is not None:  # the same, in C (data_pipeline/_native.c)
            return native.messages_views(records, prefix)
        texts: list[str] = []
        role_content = attrgetter("role", "content")
        for record in records:
            by_role = dict(map(role_content, record.messages))  # (no Python frame per message)
            user, assistant = by_role.get("user"), by_role.get("assistant")
            if len(by_role) < len(record.messages) or user is None or assistant is None:
                return None
            if prefix and by_role.get("system", "").strip():
                if not user or user.isspace():
                    return None
                user = f"{by_role['system']}\n\n{user}"
            texts += (user, assistant)
        return _none_if_blank(texts)

    def _fields(self, record: dict) -> list[str]:
        views = []
        for name in self.fields:
            value = record.get(name)
            if value is None:
                raise SkipRecord("missing_view", f"no field {name!r}")
            if not isinstance(value, str):
                raise SkipRecord("bad_record", f"field {name!r} is a {type(value).__name__}")
            if not value or value.isspace():  # (= not value.strip(), without copying it)
                raise SkipRecord("empty_view", f"field {name!r} is empty")
            views.append(value)
        return views

    def _extract_messages(self, record: dict) -> list[str]:
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise SkipRecord("missing_view", "no `messages` list")
        by_role: dict[str, str] = {}
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise SkipRecord("bad_record", "a message without string `content`")
            role = m.get("role")
            if role in by_role:
                raise SkipRecord("bad_record", f"more than one {role!r} message")
            by_role[role] = m["content"]
        for role in ("user", "assistant"):
            if role not in by_role:
                raise SkipRecord("missing_view", f"no {role} message")
            if not by_role[role] or by_role[role].isspace():
                raise SkipRecord("empty_view", f"empty {role} message")
        user = by_role["user"]
        if self.system_prompt == "prefix" and by_role.get("system", "").strip():
            user = f"{by_role['system']}\n\n{user}"
        return [user, by_role["assistant"]]


def _none_if_blank(texts: list[str]) -> list[str] | None:
    """texts, or None when one is empty or blank (record by record, that view is named)."""
    return None if not all(texts) or any(map(str.isspace, texts)) else texts


def _decode_lines(
    block: bytes, decoder: msgspec.json.Decoder, lines: int | None = None
) -> list | None:
    """One struct per line of a block, or None. Where every line starts with "{" and ends with
    "}" (each newline stands between the two), one call decodes the block: a newline after a
    "}" that closes an inner object, or inside a string, would be followed by "{" where JSON
    allows none (or be a raw control character), so every line holds whole values, at least
    one, and as many values as lines means one each. Other blocks (CRLF lines, spaces around a
    line, blank lines) are decoded line by line. `lines`: the block's, where the reader counted
    them."""
    lines = block.count(b"\n") + 1 if lines is None else lines
    if block[:1] == b"{" and block[-1:] == b"}" and block.count(b"}\n{") == lines - 1:
        records = decoder.decode_lines(block)
        return records if len(records) == lines else None
    return list(map(decoder.decode, block.split(b"\n")))


@functools.cache
def _block_decoder(mode: str, fields: tuple[str, ...]) -> msgspec.json.Decoder:
    """Decodes one line into a struct holding only the views (ViewSpec.extract_block). The
    structs hold strings and lists, no cycles: untracked by the garbage collector (gc=False),
    which would otherwise scan every decoded record (~40% of the decoding time)."""
    if mode == "messages":
        message = msgspec.defstruct("Message", [("role", str), ("content", str)], gc=False)
        record = msgspec.defstruct("Record", [("messages", list[message])], gc=False)
    else:  # attributes f0, f1, ...: field names need not be identifiers
        attrs = _block_attrs(len(fields))
        record = msgspec.defstruct("Record", [(a, str) for a in attrs],
                                   rename=dict(zip(attrs, fields)), gc=False)  # fmt: skip
    return msgspec.json.Decoder(record)


@functools.cache
def _block_attrs(n: int) -> tuple[str, ...]:
    return tuple(f"f{i}" for i in range(n))


def iter_view_texts(
    inputs: str | list[str],
    views: str | list[str],
    system_prompt: str = "drop",
    on_skip: Callable[[str, SkipRecord], None] | None = None,
) -> Iterator[str]:
    """The text of every view of every valid record (tokenizer training). Bad records are
    skipped; on_skip(location, reason) hears of each one."""
    spec = ViewSpec.parse(views, system_prompt)
    for unit in plan_units(expand_inputs(inputs), shard_bytes=1 << 62):
        for location, record in iter_unit(unit):
            try:
                if isinstance(record, SkipRecord):
                    raise record
                texts = spec.extract(record)
            except SkipRecord as err:
                if on_skip is not None:
                    on_skip(location, err)
                continue
            yield from texts
