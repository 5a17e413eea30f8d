"""Offline preprocessing: raw records → multi-view token shards + manifest.json.

    python -m data_pipeline.preprocess --inputs 'corpus/*.jsonl' --views messages \
        --tokenizer TOK_DIR --out SHARDS_DIR --num_workers 2 --max_record_tokens 1024 \
        --val_fraction 0.05 [--strict] [--shard_index I --shard_count N]

The inputs are cut into work units (data_pipeline.sources.plan_units); unit u becomes the shards
`shards/u.train` and `shards/u.val`. Units are independent, so the output is byte-identical for
any number of workers, and a Slurm array splits them with --shard_index/--shard_count. A finished
unit leaves `shards/u.json`; a rerun skips those and redoes the rest. Whoever finds every unit
finished writes manifest.json. Format: data_pipeline/README.md.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline import shards as shard_io
from data_pipeline.native import native
from data_pipeline.sources import (
    JSONL_KINDS,
    SKIP_REASONS,
    Counted,
    InputError,
    SkipRecord,
    Unit,
    ViewSpec,
    expand_inputs,
    iter_line_blocks,
    iter_parquet_batches,
    iter_records,
    join_parts,
    line_number_at,
    parquet_rows,
    parse_block,
    plan_parts,
)
from data_pipeline.tokenizer import Encoder

SCHEMA_VERSION = 1
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
MAX_SKIP_EXAMPLES = 5
# A tokenizer call takes records until their views hold ENCODE_CHARS characters (or ENCODE_BATCH
# records): gigatoken's cost per call is ~2.5 ms whatever its size (1,024 short records: half the
# time), and a few MiB of text bound the memory of a batch of long documents.
ENCODE_CHARS, ENCODE_BATCH = 4 << 20, 65536
SPLITS = ("train", "val")


class StrictError(RuntimeError):
    pass


@dataclass(frozen=True)
class Settings:
    """Everything that determines the bytes of the output (recorded in plan.json / manifest)."""

    views: ViewSpec
    tokenizer_hash: str
    vocab_size: int
    dtype: str
    max_record_tokens: int
    val_fraction: float
    shard_bytes: int
    lm_views: tuple[int, ...]
    lm_loss_views: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "views": {"mode": self.views.mode, "names": list(self.views.names),
                      "system_prompt": self.views.system_prompt},
            "tokenizer_hash": self.tokenizer_hash, "vocab_size": self.vocab_size,
            "dtype": self.dtype, "max_record_tokens": self.max_record_tokens,
            "val_fraction": self.val_fraction, "shard_bytes": self.shard_bytes,
            "lm_views": list(self.lm_views), "lm_loss_views": list(self.lm_loss_views),
        }  # fmt: skip


def is_validation(views: list[str], val_fraction: float) -> bool:
    """Stable per-record split: a hash of the record's content, not of its position."""
    return bool(validation_mask(views, len(views), val_fraction)[0])


_blake2b_8 = functools.partial(hashlib.blake2b, digest_size=8)


def validation_mask(texts: list[str], n_views: int, val_fraction: float) -> np.ndarray:
    """is_validation of every record of `texts` (n_views views each, back to back): blake2b of
    its views joined by U+001F, read as a little-endian fraction of 2^64, below val_fraction.
    In C where built (data_pipeline/_native.c), else the calls chain in C (map), no Python
    frame per record. float64(h) / 2^64 is Python's correctly rounded int(h) / 2**64
    (dividing by a power of two only shifts the exponent).
    Views hold no lone surrogate (extract skips those), so plain UTF-8 is their bytes."""
    n = len(texts) // n_views
    if val_fraction <= 0:
        return np.zeros(n, bool)
    if native is not None:
        digests = native.split_digests(texts, n_views)
    else:
        joined = texts if n_views == 1 else map("\x1f".join, zip(*[iter(texts)] * n_views))
        digests = b"".join(map(hashlib.blake2b.digest, map(_blake2b_8, map(str.encode, joined))))
    return np.frombuffer(digests, "<u8").astype(np.float64) / 2.0**64 < val_fraction


# ---------------------------------------------------------------------------------------------
# Token ids of a batch of texts (in a worker process)

_worker_encoder = None


def _load_encoder(tokenizer_json: str) -> Encoder:
    global _worker_encoder
    if _worker_encoder is None or _worker_encoder.path != tokenizer_json:
        _worker_encoder = Encoder(tokenizer_json)
    return _worker_encoder


# ---------------------------------------------------------------------------------------------
# One part of a work unit (runs in a worker process)


def _part_prefix(shard_dir: Path, unit_id: int, part: int, split: str) -> Path:
    """A part's shard: temporary (".tmp" in its name), merged into the unit's when all are done."""
    return shard_dir / f"{unit_id:05d}.{split}.tmp-part{part:05d}"


def process_unit(args: tuple) -> tuple[int, int | None, dict]:
    """Part `part` of unit `unit_id` (None: the whole unit) → its shards and what it skipped. A
    whole unit's shards are final and its json written; a part's shards are temporary, merged
    by the driver once every part of the unit is done (_merge_unit)."""
    unit_id, part, unit, settings, tokenizer_json, out_dir, strict = args
    encode = _load_encoder(tokenizer_json)
    shard_dir = Path(out_dir) / "shards"
    dtype = shard_io.np.dtype(settings.dtype)
    n_views = len(settings.views.names)
    writers: dict[str, shard_io.ShardWriter] = {}
    skipped: Counter = Counter()
    # (record number, line or row index, "reason: detail"): the first few in input order
    examples: list[tuple[int, int, str]] = []
    damaged: list[str] = []  # every file whose rest could not be read, whatever the count above
    input_records = 0

    def skip(index: int, err: SkipRecord, number: int) -> None:
        if strict:
            first = unit.first_line or line_number_at(unit.path, unit.start)  # (it stops the run)
            raise StrictError(err.describe(unit.where(index, first)))
        skipped[err.reason] += 1
        examples.append((number, index, f"{err.reason}: {err.detail}"))
        if err.ends_file:  # (compressed files: one unit, numbered from line 1)
            damaged.append(err.describe(unit.where(index)))
        if len(examples) > 4 * MAX_SKIP_EXAMPLES:  # too_long is found later, in batches
            examples[:] = sorted(examples)[:MAX_SKIP_EXAMPLES]

    def flush(batch: _Batch) -> None:
        """Encodes a batch, skips what is too long or empty, writes the rest (numpy, no Python
        work per token)."""
        ids, lengths = encode(batch.texts)
        n = batch.records
        lengths = lengths.reshape(n, n_views)
        sizes = lengths.sum(axis=1)
        too_long = sizes > settings.max_record_tokens
        empty = (lengths == 0).any(axis=1) & ~too_long
        dropped = np.flatnonzero(too_long | empty).tolist()
        for i, (number, index) in zip(dropped, batch.origins(dropped)):
            if too_long[i]:
                reason = SkipRecord("too_long", f"{sizes[i]} tokens > {settings.max_record_tokens}")
            else:
                reason = SkipRecord("empty_view", "a view has no tokens")
            skip(index, reason, number)
        keep = ~(too_long | empty)
        val = validation_mask(batch.texts, n_views, settings.val_fraction)
        for split, records in (("train", keep & ~val), ("val", keep & val)):
            if records.all():
                writers[split].add_batch(ids, lengths)
            elif records.any():
                writers[split].add_batch(ids[np.repeat(records, sizes)], lengths[records])
        batch.clear()

    try:
        for s in SPLITS:
            prefix = shard_dir / f"{unit_id:05d}.{s}" if part is None else _part_prefix(
                shard_dir, unit_id, part, s)  # fmt: skip
            writers[s] = shard_io.ShardWriter(prefix, n_views, dtype, fsync=part is None)
        batch, extract = _Batch(), settings.views.extract

        def take(records) -> None:
            """Records one by one: (index, record or SkipRecord)."""
            nonlocal input_records
            for index, record in records:
                input_records += 1
                if isinstance(record, SkipRecord):
                    skip(index, record, input_records)
                    continue
                try:
                    views = extract(record)
                except SkipRecord as err:
                    skip(index, err, input_records)
                    continue
                batch.add(input_records, index, views)
                if batch.full:
                    flush(batch)

        def take_block(first: int, texts: list[str], n: int) -> None:
            """n valid records, from index `first` on, their views back to back."""
            nonlocal input_records
            batch.add_block(input_records + 1, first, texts, n)
            input_records += n
            if batch.full:
                flush(batch)

        views, lines = settings.views, 0
        if unit.kind in JSONL_KINDS:  # a block of lines at a time, where every line is a record
            blocks = Counted(iter_line_blocks(unit))
            for first, n, block in blocks:
                if isinstance(block, SkipRecord):  # (a damaged compressed file)
                    take([(first, block)])
                elif (texts := views.extract_block(block, n)) is not None:
                    take_block(first, texts, n)
                else:  # some line is not a plain valid record: each one's reason
                    take(parse_block(first, block))
            lines = blocks.lines
        elif unit.kind == "parquet":  # the view columns only, a batch of rows at a time
            for first, rows in iter_parquet_batches(unit, views.columns):
                if (texts := views.extract_columns(rows)) is not None:
                    take_block(first, texts, rows.num_rows)
                else:
                    take(parquet_rows(first, rows))
        else:
            take(iter_records(unit))
        flush(batch)
        meta = {"input_records": input_records, "lines": lines, "skipped": dict(skipped),
                "examples": sorted(examples)[:MAX_SKIP_EXAMPLES], "damaged_files": damaged}  # fmt: skip
        if part is not None:
            for w in writers.values():
                w.close()
            return unit_id, part, meta
        return unit_id, None, _close_unit(shard_dir, unit_id, writers, _unit_meta(unit, [meta]))
    except BaseException as e:
        for w in writers.values():
            with contextlib.suppress(OSError):  # its close flushes: on a full disk that fails too
                w.abort()
        if part is None:  # (a part's unit is discarded by the driver, once no part is written)
            _discard_unit(shard_dir, unit_id)  # a rerun redoes the unit: nothing of it is left
        _name_full_disk(e, shard_dir)
        raise


class _Batch:
    """Records waiting for one tokenizer call: their views (n_views texts each, back to back)
    and where they came from, as runs of consecutive records (first record number, first line
    or row index, count): a block of lines is one run, not a Python int per record."""

    def __init__(self):
        self.runs: list[tuple[int, int, int]] = []
        self.texts: list[str] = []
        self.records = 0
        self.chars = 0

    def add(self, number: int, index: int, views: list[str]) -> None:
        self.add_block(number, index, views, 1)

    def add_block(self, number: int, index: int, texts: list[str], n: int) -> None:
        """n records numbered from `number`, on the lines from `index` on."""
        self.runs.append((number, index, n))
        self.texts += texts
        self.records += n
        self.chars += sum(map(len, texts))

    def origins(self, positions: list[int]) -> Iterator[tuple[int, int]]:
        """(record number, line or row index) of the batch's records at these positions."""
        ends = list(itertools.accumulate(n for _, _, n in self.runs))
        for i in positions:
            run = bisect.bisect_right(ends, i)
            number, index, n = self.runs[run]
            offset = i - (ends[run] - n)
            yield number + offset, index + offset

    @property
    def full(self) -> bool:
        return self.chars >= ENCODE_CHARS or self.records >= ENCODE_BATCH

    def clear(self) -> None:
        self.runs.clear()
        self.texts.clear()
        self.records = self.chars = 0


def _unit_meta(unit: Unit, parts: list[dict]) -> dict:
    """A unit's metadata from its parts': record numbers and line indices in skip examples count
    from the unit's start, so the first examples are the unit's first, whatever its parts. Skip
    examples are [line (or row) index, "reason: detail"]: resolve_lines names them."""
    skipped, examples, damaged, records, lines = Counter(), [], [], 0, 0
    for meta in parts:  # (Parquet and datasets parts read no lines: their indices are rows)
        skipped.update(meta["skipped"])
        examples.extend((records + n, lines + i, text) for n, i, text in meta["examples"])
        damaged.extend(meta["damaged_files"])
        records += meta["input_records"]
        lines += meta["lines"]
    first = sorted(examples)[:MAX_SKIP_EXAMPLES]
    return {"unit": unit.to_dict(), "input_records": records, "lines": lines,
            "skipped": dict(skipped),
            "skip_examples": [[i, text] for _, i, text in first],
            "damaged_files": damaged}  # fmt: skip


def resolve_lines(metas: list[dict]) -> list[dict]:
    """Units' metadata (in plan order) with every skip example as `location: reason: detail`: a
    JSONL unit whose first line the plan did not count starts where the unit before it in the
    same file ended (each unit's json has the lines it read). Strings (units written before
    2026-12-01) are kept."""
    out, line = [], {}  # path → the line number after the units seen so far
    for meta in metas:
        unit = Unit(**meta["unit"])
        first = unit.first_line or line.get(unit.path, 0)
        if "lines" in meta and first:
            line[unit.path] = first + meta["lines"]
        examples = [e if isinstance(e, str) else f"{unit.where(e[0], first)}: {e[1]}"
                    for e in meta["skip_examples"]]  # fmt: skip
        out.append({**meta, "skip_examples": examples})
    return out


def _merge_unit(shard_dir: Path, unit_id: int, unit: Unit, parts: list[dict],
                settings: Settings) -> dict:  # fmt: skip
    """The unit's shards from its parts' shards, in order: byte for byte what one worker
    writing the whole unit gives."""
    n_views, dtype = len(settings.views.names), shard_io.np.dtype(settings.dtype)
    writers: dict[str, shard_io.ShardWriter] = {}
    part_prefixes = [
        [_part_prefix(shard_dir, unit_id, p, s) for s in SPLITS] for p in range(len(parts))
    ]
    try:
        for j, split in enumerate(SPLITS):
            w = writers[split] = shard_io.ShardWriter(
                shard_dir / f"{unit_id:05d}.{split}", n_views, dtype
            )
            for prefixes in part_prefixes:
                w.append_shard(prefixes[j])
        for prefix in itertools.chain.from_iterable(part_prefixes):  # gone before the unit's json
            Path(f"{prefix}.bin").unlink()
            Path(f"{prefix}.idx").unlink()
        return _close_unit(shard_dir, unit_id, writers, _unit_meta(unit, parts))
    except BaseException as e:
        for w in writers.values():
            with contextlib.suppress(OSError):
                w.abort()
        _name_full_disk(e, shard_dir)
        raise


def _close_unit(shard_dir: Path, unit_id: int, writers: dict, meta: dict) -> dict:
    meta["shards"] = []
    for split, w in writers.items():
        w.close()
        prefix = shard_dir / f"{unit_id:05d}.{split}"
        meta["shards"].append({
            "name": prefix.name, "split": split, "records": w.n_records, "tokens": w.n_tokens,
            "view_tokens": w.view_tokens,
            "bin_bytes": os.path.getsize(f"{prefix}.bin"), "idx_bytes": os.path.getsize(f"{prefix}.idx"),
            "bin_sha256": shard_io.sha256_file(f"{prefix}.bin"),
            "idx_sha256": shard_io.sha256_file(f"{prefix}.idx"),
        })  # fmt: skip
    # The unit's json is its completion marker: written last, atomically.
    _publish(shard_dir / f"{unit_id:05d}.json", _dumps(meta))
    return meta


def _name_full_disk(e: BaseException, path: str | os.PathLike) -> None:
    """A failed write() names no file: say where the disk filled up."""
    if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS and not e.filename:
        e.filename = str(path)


def _publish(path: Path, data: bytes) -> None:
    """shard_io.write_atomic, naming `path` if the disk is full and leaving no temporary file."""
    try:
        shard_io.write_atomic(path, data)
    except BaseException as e:
        Path(f"{path}.tmp{os.getpid()}").unlink(missing_ok=True)  # write_atomic's temporary name
        _name_full_disk(e, path)
        raise


def _discard_unit(shard_dir: Path, unit_id: int) -> None:
    """Removes every file of an unfinished unit: temporary files and shards without their json."""
    for path in shard_dir.glob(f"{unit_id:05d}.*"):
        path.unlink(missing_ok=True)


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def unit_is_done(out_dir: Path, unit_id: int) -> dict | None:
    """The unit's metadata if its shards are complete, else None (partial output is redone)."""
    meta_path = out_dir / "shards" / f"{unit_id:05d}.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    for s in meta["shards"]:
        for ext in ("bin", "idx"):
            p = out_dir / "shards" / f"{s['name']}.{ext}"
            if not p.exists() or p.stat().st_size != s[f"{ext}_bytes"]:
                return None
    return meta


# ---------------------------------------------------------------------------------------------
# Driver


def build_manifest(out_dir: Path, settings: Settings, inputs: list[Path], metas: list[dict],
                   specials: dict) -> dict:  # fmt: skip
    shards, skipped, examples, damaged = [], Counter(), [], []
    input_records = 0
    for meta in resolve_lines(metas):
        input_records += meta["input_records"]
        skipped.update(meta["skipped"])
        examples.extend(meta["skip_examples"])
        damaged.extend(meta.get("damaged_files", []))
        shards.extend({**s, "unit": meta["unit"]} for s in meta["shards"])
    splits = {}
    for split in SPLITS:
        part = [s for s in shards if s["split"] == split]
        view_tokens = [
            sum(s["view_tokens"][j] for s in part) for j in range(len(settings.views.names))
        ]
        splits[split] = {"records": sum(s["records"] for s in part),
                         "tokens": sum(s["tokens"] for s in part), "view_tokens": view_tokens}  # fmt: skip
    written = sum(v["records"] for v in splits.values())
    assert input_records == written + sum(skipped.values()), "record accounting is broken"
    return {
        "schema_version": SCHEMA_VERSION,
        "tokenizer": {
            "hash": settings.tokenizer_hash,
            "vocab_size": settings.vocab_size,
            "dir": "tokenizer",
            "special_ids": specials,
        },  # fmt: skip
        "settings": settings.to_dict(),
        "inputs": [{"path": str(p), "bytes": _input_bytes(p)} for p in inputs],
        "input_records": input_records,
        "written_records": written,
        "skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS},
        # the first few skips, then every damaged file (a cut-short .gz) however late it comes
        "skip_examples": examples[:MAX_SKIP_EXAMPLES]
        + [d for d in damaged if d not in examples[:MAX_SKIP_EXAMPLES]],
        "splits": splits,
        "shards": shards,
    }


def _input_bytes(p: Path) -> int:
    return (
        sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        if p.is_dir()
        else p.stat().st_size
    )


class _CopyFailed(Exception):
    """Not an OSError, so copytree stops at it instead of collecting it into a shutil.Error
    of strings (which loses the errno: a full disk would not be recognised)."""


def _copy_file(src: str, dst: str) -> None:
    try:
        shutil.copy2(src, dst)
    except OSError as e:
        _name_full_disk(e, dst)
        raise _CopyFailed from e


def _copy_tokenizer(src: Path, out_dir: Path) -> None:
    dst = out_dir / "tokenizer"
    if dst.exists():
        return
    tmp = out_dir / f"tokenizer.tmp{os.getpid()}"
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=_copy_file)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, _CopyFailed):
            raise e.__cause__ from None
        raise
    try:
        os.replace(tmp, dst)
    except OSError:  # another task published it first
        shutil.rmtree(tmp, ignore_errors=True)


PLAN_LOCK_STALE_S = 120  # a planning task refreshes its lock every PLAN_LOCK_STALE_S / 4
PARTS_PER_INPUT = 64  # parts planned for the inputs as a whole (part_bytes_for)
PART_BYTES_MIN, PART_BYTES_MAX = 256 << 10, 8 << 20


def input_sizes(paths: list[Path]) -> list[int]:
    """Bytes of each input (a datasets folder: of its files): a changed input changes the plan."""
    return [sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir()
            else p.stat().st_size for p in paths]  # fmt: skip


def part_bytes_for(total_bytes: int, shard_bytes: int) -> int:
    """Raw input per part: about PARTS_PER_INPUT parts in all, so that every worker has work
    even when the input is one small file, within [PART_BYTES_MIN, PART_BYTES_MAX] and at most
    shard_bytes. Only the inputs' size decides it, never --num_workers; and the output does not
    depend on it (a unit's parts are merged into the bytes one worker would write)."""
    return max(
        1, min(shard_bytes, PART_BYTES_MAX, max(PART_BYTES_MIN, total_bytes // PARTS_PER_INPUT))
    )


def plan_once(out_dir: Path, paths: list[Path], settings: Settings,
              shard_bytes: int) -> tuple[list[Unit], list[list[Unit]]]:  # fmt: skip
    """The work units and their parts, planned by one task for all (planning reads a few KiB at
    each JSONL cut): the first task to take out_dir/plan.lock plans and publishes plan.json while
    refreshing the lock; the others wait for plan.json, and take over a lock not refreshed for
    PLAN_LOCK_STALE_S seconds (its task died). A plan.json made with other settings or inputs is
    refused (_check_plan)."""
    sizes = input_sizes(paths)
    head = {"settings": settings.to_dict(), "inputs": [str(p) for p in paths],
            "input_sizes": sizes}  # fmt: skip
    lock, plan_path = out_dir / "plan.lock", out_dir / "plan.json"
    while True:
        if plan_path.exists():
            plan = json.loads(plan_path.read_text())
            known = {k: v for k, v in head.items() if k in plan}  # input_sizes: since 2026-12-01
            if {k: plan[k] for k in known} == known:
                units = [Unit(**u) for u in plan["units"]]
                parts = plan.get("parts") or [[u.to_dict()] for u in units]  # since 2026-12-02
                return units, [[Unit(**p) for p in ps] for ps in parts]
            _check_plan(out_dir, {**plan, **known})  # refuses, naming what differs
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            if age > PLAN_LOCK_STALE_S:
                print(f"[preprocess] {lock} not refreshed for {age:.0f} s: its task is gone; "
                      "planning here", file=sys.stderr)  # fmt: skip
                lock.unlink(missing_ok=True)
            else:
                time.sleep(0.5)
            continue
        os.close(fd)
        stop = threading.Event()
        beat = threading.Thread(target=_refresh, args=(lock, stop), daemon=True)
        beat.start()
        try:
            if not plan_path.exists():  # another task may have finished just before our lock
                parts = plan_parts(paths, shard_bytes, part_bytes_for(sum(sizes), shard_bytes))
                _check_plan(out_dir, {**head, "units": [join_parts(ps).to_dict() for ps in parts],
                                      "parts": [[p.to_dict() for p in ps] for ps in parts]})  # fmt: skip
        finally:
            stop.set()
            beat.join()
            lock.unlink(missing_ok=True)


def _refresh(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(PLAN_LOCK_STALE_S / 4):
        with contextlib.suppress(OSError):
            os.utime(lock)


def _check_plan(out_dir: Path, plan: dict) -> None:
    """Refuse to mix outputs of different settings in one folder; concurrent tasks agree."""
    path = out_dir / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise InputError(
                f"{out_dir} holds output made with other settings (differs in: {', '.join(diff)}); "
                "use a new --out folder"
            )
    else:
        _publish(path, _dumps(plan))


def _parse_views_list(value, n_views: int, name: str) -> tuple[int, ...]:
    if value in (None, "all"):
        return tuple(range(n_views))
    items = (
        [value]
        if isinstance(value, int)
        else str(value).replace("(", "").replace(")", "").split(",")
    )
    views = tuple(int(v) for v in items if str(v).strip() != "")
    if not views or any(not 0 <= v < n_views for v in views):
        raise InputError(f"--{name}: view indices must lie in 0..{n_views - 1}, got {value!r}")
    return views


def preprocess(
    inputs,
    views,
    tokenizer: str,
    out: str,
    num_workers: int = 1,
    max_record_tokens: int = 1024,
    val_fraction: float = 0.05,
    strict: bool = False,
    system_prompt: str = "drop",
    lm_views="all",
    lm_loss_views="all",
    shard_bytes: int = 512 << 20,
    shard_index: int = 0,
    shard_count: int = 1,
    progress: bool = True,
) -> dict | None:
    """Runs this task's units; returns the manifest once every unit of the output is done."""
    from data_pipeline.tokenizer import load_tokenizer, special_token_ids, tokenizer_hash

    if not 0 <= shard_index < shard_count:
        raise InputError(f"--shard_index must lie in 0..{shard_count - 1}, got {shard_index}")
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val_fraction must lie in [0, 1), got {val_fraction}")
    spec = ViewSpec.parse(views, system_prompt)
    paths = expand_inputs(inputs)
    tok_dir = Path(tokenizer)
    if not (tok_dir / "tokenizer.json").exists():
        raise InputError(
            f"--tokenizer {tok_dir}: no tokenizer.json (make one with data_pipeline.tokenizer)"
        )
    tok = load_tokenizer(tok_dir)
    specials = special_token_ids(tok)
    lm = _parse_views_list(lm_views, len(spec.names), "lm_views")
    if lm[0] != 0:
        raise InputError(f"--lm_views must start with view 0, got {lm_views!r}")
    loss_views = _parse_views_list(lm_loss_views, len(spec.names), "lm_loss_views")
    if not set(loss_views) <= set(lm):
        raise InputError(f"--lm_loss_views {lm_loss_views!r} must be among --lm_views {lm_views!r}")
    settings = Settings(
        views=spec, tokenizer_hash=tokenizer_hash(tok_dir), vocab_size=len(tok),
        dtype=shard_io.dtype_for_vocab(len(tok)).str, max_record_tokens=max_record_tokens,
        val_fraction=val_fraction, shard_bytes=shard_bytes, lm_views=lm,
        lm_loss_views=lm if lm_loss_views in (None, "all") else loss_views,
    )  # fmt: skip
    if native is None and os.environ.get("LLM_JEPA_PURE_PYTHON") != "1":
        print("[preprocess] data_pipeline/_native.c is not built (no C compiler at install?): "
              "its per-record work runs in Python (same output, slower)", file=sys.stderr)  # fmt: skip
    out_dir = Path(out)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    units, parts = plan_once(out_dir, paths, settings, shard_bytes)
    _copy_tokenizer(tok_dir, out_dir)

    mine = [i for i in range(len(units)) if i % shard_count == shard_index]
    todo = [i for i in mine if unit_is_done(out_dir, i) is None]
    _run_units(todo, units, parts, settings, str(tok_dir / "tokenizer.json"), out_dir, strict,
               num_workers, progress, n_done=len(mine) - len(todo))  # fmt: skip

    metas = [unit_is_done(out_dir, i) for i in range(len(units))]
    if any(m is None for m in metas):
        missing = sum(m is None for m in metas)
        print(f"[preprocess] {missing} of {len(units)} units belong to other tasks and are not done yet; "
              "the last task to finish writes manifest.json", file=sys.stderr)  # fmt: skip
        return None
    manifest = build_manifest(out_dir, settings, paths, metas, specials)
    _publish(out_dir / "manifest.json", _dumps(manifest))
    return manifest


def _init_worker() -> None:
    # One process per core: a worker's tokenizer must not start a thread per core as well.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _run_units(todo, units, parts, settings, tokenizer_json, out_dir, strict, num_workers,
               progress, n_done):  # fmt: skip
    """Runs the parts of the units `todo` on num_workers processes, and merges each unit's parts
    as soon as they are all done (here, while the workers go on). One worker takes whole units:
    the same bytes, without the parts' files and the copy that merges them."""
    from tqdm import tqdm

    shard_dir = out_dir / "shards"
    jobs = []
    for i in todo:
        _discard_unit(shard_dir, i)  # what an unfinished earlier run left of it
        if num_workers == 1 or len(parts[i]) == 1:
            jobs.append((i, None, units[i], settings, tokenizer_json, str(out_dir), strict))
            continue
        jobs.extend((i, p, part, settings, tokenizer_json, str(out_dir), strict)
                    for p, part in enumerate(parts[i]))  # fmt: skip
    bar = tqdm(total=len(jobs), unit="part" if len(jobs) > len(todo) else "shard",
               disable=not progress, desc="preprocess",
               initial=0, dynamic_ncols=True)  # fmt: skip
    if n_done:
        bar.write(f"[preprocess] {n_done} finished shards found, skipped")
    t0, records, tokens = time.perf_counter(), 0, 0
    done: dict[int, dict[int, dict]] = {i: {} for i in todo}
    ctx = mp.get_context("spawn")  # workers start clean: no forked tokenizer thread pools
    workers = min(num_workers, len(jobs))
    pool = ctx.Pool(workers, initializer=_init_worker) if workers > 1 else None
    try:
        results = pool.imap_unordered(process_unit, jobs) if pool else map(process_unit, jobs)
        for i, p, meta in results:
            bar.update(1)
            if p is not None:
                done[i][p] = meta
                if len(done[i]) < len(parts[i]):
                    continue
                meta = _merge_unit(shard_dir, i, units[i], [done[i][k] for k in range(len(parts[i]))],
                                   settings)  # fmt: skip
            records += sum(s["records"] for s in meta["shards"])
            tokens += sum(s["tokens"] for s in meta["shards"])
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(records=records, tok_per_s=f"{tokens / dt:,.0f}")
    except BaseException:
        if pool:  # stop the other workers before removing what they were writing
            pool.terminate()
            pool.join()
            pool = None
        for i in todo:  # this task's units: no other task writes them
            if unit_is_done(out_dir, i) is None:
                _discard_unit(shard_dir, i)
        raise
    finally:
        if pool:
            pool.terminate()
            pool.join()
        bar.close()


def _summarize(manifest: dict, out: str) -> None:
    sk = {k: v for k, v in manifest["skipped"].items() if v}
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"[preprocess] {manifest['input_records']} records read: {tr['records']} train "
          f"({tr['tokens']} tokens), {va['records']} val ({va['tokens']} tokens), "
          f"{sum(sk.values())} skipped {sk or ''} -> {out}/manifest.json")  # fmt: skip
    for ex in manifest["skip_examples"]:
        print(f"[preprocess]   skipped {ex}")


def _cli_args(argv: list[str]) -> list[str]:
    """`--inputs a.jsonl b.jsonl --views …` as the tokenizer command takes it: the values after
    --inputs up to the next flag become one comma-separated value. Any other bare word is an
    error (fire would pass it to the next parameter: `--max_record_tokens b.jsonl`)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--inputs":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            out += [arg, ",".join(argv[i + 1 : j])] if j > i + 1 else [arg]
            i = j
            continue
        if not arg.startswith("-"):
            raise InputError(f"unexpected argument {arg!r}: every option is a --flag VALUE pair")
        out.append(arg)
        if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(argv[i + 1])
            i += 1
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    import functools

    import fire

    @functools.wraps(preprocess)  # fire reads preprocess's signature: unknown flags are errors
    def run(*args, **kwargs):
        manifest = preprocess(*args, **kwargs)
        if manifest is not None:
            _summarize(manifest, str(kwargs.get("out", args[3] if len(args) > 3 else "")))

    try:
        command = _cli_args(sys.argv[1:] if argv is None else list(argv))
        fire.Fire(run, command=command, name="data_pipeline.preprocess")
    except (InputError, StrictError, shard_io.ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in FULL_DISK_ERRNOS:
            raise
        # Not the user's command that is wrong (exit 2): the run failed; a rerun with space resumes.
        where = e.filename2 or e.filename  # a failed copy names the source first
        print(f"error: {os.strerror(e.errno).lower()}: {where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
