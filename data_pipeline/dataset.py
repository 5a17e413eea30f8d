"""The dataset the engine consumes: shard folders → blended, shuffled, rank-split, packed rows.

Order. An epoch is a list of sample ids over all sources: source i contributes n_i samples
(its record count; with weights, as many records as give it weight_i / Σ weights of the
epoch's tokens (blend_by="tokens", as Megatron and OLMo-core blend) or of its records
(blend_by="records"): a source is then subsampled or repeated), drawn from a per-epoch
permutation of its records; the list is shuffled with (seed, epoch). Rank r of W takes every
W-th entry from r.

Resume. A rank's position is (epoch, cursor into its part). `merge_states` combines all ranks'
positions into one state that `load_state_dict` continues exactly at the same world size. At
another world size the records the old ranks consumed are removed from the epoch (a "layer") and
the rest is split among the new ranks, so the epoch is still seen exactly once. Rows a rank had
already taken from the *next* epoch are seen again in that case (see data_pipeline/README.md).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline import packing, verify
from data_pipeline.order import EpochOrder, RankPart
from data_pipeline.shards import ShardError, ShardReader
from data_pipeline.verify import load_manifest, manifest_hash, verify_folder

STATE_VERSION = 2  # 2: epoch orders by keyed Feistel permutations (data_pipeline/order.py)
_WARNED_FORMAT_1: set[Path] = set()  # folders warned about (once per process, not per split)


class DatasetError(ValueError):
    """The data cannot give what the run asks of it (e.g. no record fits a row)."""


def check_folder(folder: Path, split: str, full: bool) -> None:
    """The start-up checks of one shard folder's split (verify_folder): ShardError naming every
    problem, in one line."""
    problems = verify_folder(folder, full=full, leftovers=False, split=split)
    if problems:
        raise ShardError(f"{folder}: " + "; ".join(problems))


CheckUnit = tuple[Path, str, bool]  # (shard folder, split, full): one check_folder call


def check_share(units: Sequence[CheckUnit], rank: int, world_size: int) -> list[dict]:
    """This rank's share of check_folder's work over `units`: every world_size-th shard, counted
    over all units in order (rank 0 also each manifest's totals and the tokenizer). Only
    problems are kept: per unit {"manifest": message} or {"head", "shards": {shard number:
    problems}, "tail"}, where an OSError that stopped a check is its message in place of a
    list. first_check_error merges the shares of all ranks."""
    out, k, manifests = [], 0, {}
    for folder, split, full in units:
        if folder not in manifests:  # once per folder (both splits): ∝ shards to parse
            try:
                manifests[folder] = load_manifest(folder)
            except ShardError as e:  # every rank reads the same file: the same outcome
                manifests[folder] = {"manifest": [str(e)]}
            except OSError as e:
                manifests[folder] = {"manifest": str(e)}
        manifest = manifests[folder]
        if "manifest" in manifest:  # it could not be read
            out.append(manifest)
            continue
        n_views = len(manifest["settings"]["views"]["names"])
        vocab_size = int(manifest["tokenizer"]["vocab_size"])
        share: dict = {"shards": {}}
        if rank == 0:
            share["head"] = _problems(verify._verify_totals, folder, manifest)
        for s in manifest["shards"]:
            if s["split"] != split:
                continue
            if k % world_size == rank:
                prefix = folder / "shards" / s["name"]
                found = _problems(verify._verify_shard, prefix, s, n_views, vocab_size, full)
                if found:
                    share["shards"][k] = found
            k += 1
        if rank == 0:
            share["tail"] = _problems(verify._verify_tokenizer, folder, manifest, full)
        out.append(share)
    return out


def _problems(check, *args) -> list[str] | str:
    """A check's problems, or the message of the OSError that stopped it."""
    try:
        return check(*args)
    except OSError as e:
        return str(e)


def first_check_error(units: Sequence[CheckUnit], shares: Sequence[list[dict]]) -> str | None:
    """From every rank's check_share: the error of the first unit with a problem, as one process
    gets it from check_folder (every problem of that folder's split in one line, or the OSError
    that stopped its checks); None when all are sound."""
    for u, (folder, _, _) in enumerate(units):
        parts = [share[u] for share in shares]
        if "manifest" in parts[0]:
            results = [parts[0]["manifest"]]
        else:
            shards = {k: found for part in parts for k, found in part["shards"].items()}
            results = [parts[0]["head"], *(shards[k] for k in sorted(shards)), parts[0]["tail"]]
        problems = []
        for found in results:
            if isinstance(found, str):
                return found  # an OSError: the checks stopped there
            problems += found
        if problems:
            return f"{folder}: " + "; ".join(problems)
    return None


def physical_memory() -> int:
    """Bytes of RAM (the page cache's ceiling); 0 where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class _Source:
    """One shard folder's split: record lookup and its packing rules."""

    def __init__(self, folder: Path, split: str, verify_checksums: bool, verify: bool = True,
                 random_access: bool = False):  # fmt: skip
        if verify:
            check_folder(folder, split, verify_checksums)
        self.folder, self.split = folder, split
        self.manifest = load_manifest(folder)
        self.hash = manifest_hash(folder)
        if split not in self.manifest["splits"]:
            raise ShardError(f"{folder}: no split {split!r} in the manifest")
        vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        settings = self.manifest["settings"]
        n_views, dtype = len(settings["views"]["names"]), np.dtype(settings["dtype"])
        # Counts from the manifest: a shard's files are first touched when one of its records is
        # read, and their headers checked then (every rank reading every header at start is
        # W x S x 7 metadata calls on a shared file system).
        self.readers = [
            ShardReader.from_manifest(
                folder / "shards" / s["name"], s, n_views, dtype, vocab_size, random_access
            )
            for s in self.manifest["shards"]
            if s["split"] == split and s["records"] > 0
        ]
        if not all(r.has_checksums for r in self.readers) and folder not in _WARNED_FORMAT_1:
            _WARNED_FORMAT_1.add(folder)
            print(f"WARNING: {folder}: shards of index format 1 (written before per-record "
                  "checksums): a changed token byte is caught only with "
                  "data.verify_checksums=true; preprocess into a new folder to add them",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.bounds = np.cumsum([0] + [len(r) for r in self.readers])
        self.lm_views = tuple(settings["lm_views"])
        self.lm_loss_views = tuple(settings["lm_loss_views"])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def bin_bytes(self) -> int:
        """Bytes of this split's token files (the manifest's sizes)."""
        return sum(
            int(s["bin_bytes"])
            for s in self.manifest["shards"]
            if s["split"] == self.split and s["records"] > 0
        )

    @property
    def tokens(self) -> int:
        """View tokens of this split's records (the manifest's count)."""
        return int(self.manifest["splits"][self.split]["tokens"])

    def record(self, i: int) -> list[np.ndarray]:
        shard = int(np.searchsorted(self.bounds, i, side="right")) - 1
        return self.readers[shard].record(i - int(self.bounds[shard]))


class PackedDataset:
    def __init__(
        self,
        paths: Sequence[str | Path] | str | Path,
        *,
        seq_len: int,
        predictor_tokens: int = 1,
        pairs: packing.PairMode = "first",
        weights: Sequence[float] | None = None,
        blend_by: str = "tokens",
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        overlong: packing.OverlongPolicy = "truncate",
        records_per_row: int = 0,
        packing_window: int = 16,
        readout: str = "shared",
        shuffle: bool = True,
        loop: bool = True,
        verify_checksums: bool = False,
        verify: bool = True,
    ):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("PackedDataset needs at least one shard folder")
        if weights is not None and (
            len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0
        ):
            raise ValueError(
                f"weights must be {len(paths)} non-negative numbers with a positive sum, got {weights}"
            )
        if records_per_row < 0:
            raise ValueError(f"records_per_row must be >= 0, got {records_per_row}")
        if packing_window < 0:
            raise ValueError(f"packing_window must be >= 0, got {packing_window}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sources = [_Source(Path(p), split, verify_checksums, verify) for p in paths]
        # A shuffled epoch reads one record from a random shard at a time. Readahead fills the
        # page cache with the record's neighbours: wasted reads (~110 KB per short record at
        # 10^8 records) once the data outgrows memory, but a preload while it fits (1.5x faster
        # per record once cached). Random access is advised only for the former. No map is
        # open yet: the readers map their files at their first record.
        if shuffle and sum(s.bin_bytes for s in self.sources) > physical_memory() // 2:
            for source in self.sources:
                for reader in source.readers:
                    reader.random_access = True
        hashes = {s.manifest["tokenizer"]["hash"] for s in self.sources}
        if len(hashes) > 1:
            raise ShardError(f"shard folders {paths} were made with different tokenizers")
        tok = self.sources[0].manifest["tokenizer"]
        ids = tok["special_ids"]
        self.specials = packing.SpecialIds(
            bos=ids["bos"], eos=ids["eos"], pad=ids["pad"], view_sep=ids["view_sep"],
            predictors=tuple(ids["predictors"]),
        )  # fmt: skip
        self.vocab_size = int(tok["vocab_size"])
        self.tokenizer_dir = self.sources[0].folder / tok["dir"]
        self.manifest_hash = hashlib.sha256(
            "".join(s.hash for s in self.sources).encode()
        ).hexdigest()
        self._configs = [
            packing.PackingConfig(
                seq_len=seq_len,
                specials=self.specials,
                predictor_tokens=predictor_tokens,
                pairs=pairs,
                lm_views=s.lm_views,
                lm_loss_views=s.lm_loss_views,
                overlong=overlong,
                unlabelled_readout=readout == "paper",
            )  # fmt: skip
            for s in self.sources
        ]
        self.seq_len = seq_len
        self.records_per_row = records_per_row
        # Best-fit packing over a window of `packing_window` rows' worth of records (0, or a
        # fixed records_per_row: in order).
        self.packing_window = 0 if records_per_row else packing_window
        self._rows: list[list[tuple[int, packing.RecordLayout]]] = []  # packed, not yet emitted
        self._rows_mode: bool | None = None  # the with_jepa they were laid out for
        self._carry: list[int] = []  # records of a window's emptiest row, packed with the next
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.loop = shuffle, loop
        self.weights = None if weights is None else [float(w) for w in weights]
        if blend_by not in ("tokens", "records"):
            raise ValueError(f"blend_by must be 'tokens' or 'records', got {blend_by!r}")
        self.blend_by = blend_by
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        if self.offsets[-1] == 0:
            raise ShardError(f"{paths}: split {split!r} holds no records")
        self.stats = packing.PackStats(seq_len=seq_len)
        self.paths, self.split, self.overlong = paths, split, overlong
        self._skipped_in_a_row = 0  # records skipped by the overlong policy since the last fit
        self._set_position(epoch=0, layers=[], cursor=0)

    # -- order ---------------------------------------------------------------------------------

    def order(self, epoch: int) -> EpochOrder:
        """The global order of an epoch (before the split among ranks), evaluated on demand."""
        sizes = [len(s) for s in self.sources]
        counts = sizes if self.weights is None else self.blend_counts()
        return EpochOrder(counts, sizes, self.offsets, self.seed, epoch, self.shuffle)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All sample ids of one epoch, in global order, materialised (tests, small data)."""
        order = self.order(epoch)
        return order[np.arange(len(order))]

    def blend_counts(self) -> list[int]:
        """Records each source contributes to an epoch under self.weights: weight_i / Σ weights
        of the epoch's tokens (or records), the epoch holding as many tokens (records) as all
        sources together. Tokens are the manifest's view tokens of this split."""
        wsum = sum(self.weights)
        sizes = [len(s) for s in self.sources]
        if self.blend_by == "records":
            total = sum(sizes)
            return [round(w / wsum * total) if n else 0 for w, n in zip(self.weights, sizes)]
        tokens = [s.tokens for s in self.sources]
        total = sum(tokens)
        return [round(w / wsum * total * n / t) if n and t else 0
                for w, n, t in zip(self.weights, sizes, tokens)]  # fmt: skip

    def _set_position(self, epoch: int, layers: list[dict], cursor: int) -> None:
        order = self.order(epoch)
        self._epoch_records = len(order)
        # Layers drop what ranks of an earlier world size consumed; nothing of size N is built.
        self.epoch, self._layers, self._cursor = epoch, layers, cursor
        self._part = RankPart(order, layers, self.rank, self.world_size)

    # -- records and rows ----------------------------------------------------------------------

    def record(self, sample_id: int) -> tuple[int, list[np.ndarray]]:
        """(source index, views) of a global sample id."""
        src = int(np.searchsorted(self.offsets, sample_id, side="right")) - 1
        return src, self.sources[src].record(int(sample_id - self.offsets[src]))

    def _next_row(self, with_jepa: bool) -> dict[str, np.ndarray] | None:
        if not self.packing_window:
            return self._next_row_in_order(with_jepa)
        if not self._rows or self._rows_mode != with_jepa:
            self._pack_window(with_jepa)
        if not self._rows:
            return None
        items = self._rows.pop(0)
        row = packing.assemble_row([lay for _, lay in items], [sid for sid, _ in items],
                                   self._configs[0])  # fmt: skip
        self.stats.rows += 1
        self.stats.tokens += sum(len(lay) for _, lay in items)
        self.stats.jepa_pairs += len(row["pred_index"])
        return row

    def _pack_window(self, with_jepa: bool) -> None:
        """Best-fit packing: the records of the unemitted rows (laid out again if with_jepa
        changed), those carried over from the last window, and new ones from the stream, until
        they hold packing_window rows' worth of tokens; each goes into the row it fills best (the
        longest first); rows come out in the order they were opened. The emptiest row is carried
        over to the next window while the epoch has records left. A window does not cross an
        epoch's end."""
        sids = self._carry + [sid for items in self._rows for sid, _ in items]
        self._carry = []
        items = [(sid, self._layout(sid, with_jepa)) for sid in sids]
        budget = self.packing_window * self.seq_len - sum(len(lay) for _, lay in items)
        while budget > 0 and (read := self._read(with_jepa, stop_at_end=bool(items))):
            sid, layout, fit = read
            if layout is None:
                self._skip(fit)
                continue
            self._take(fit)  # counted once, when the record leaves the stream
            items.append((sid, layout))
            budget -= len(layout)
        more = self._cursor < len(self._part)  # this epoch has records left for the next window
        rows, held = packing.best_fit_window(items, self.seq_len, hold_back=more)
        self._carry = [sid for sid, _ in held]
        self._rows, self._rows_mode = rows, with_jepa

    def _layout(self, sid: int, with_jepa: bool) -> packing.RecordLayout:
        """A pending record laid out again (its fit was counted when it was first read)."""
        src, views = self.record(sid)
        scratch = packing.PackStats(seq_len=self.seq_len)
        layout = packing.fit_record(views, self._configs[src], with_jepa, scratch)
        assert layout is not None  # the overlong policy does not depend on with_jepa
        return layout

    def _next_row_in_order(self, with_jepa: bool) -> dict[str, np.ndarray] | None:
        layouts, ids, used = [], [], 0
        while not (self.records_per_row and len(layouts) == self.records_per_row):
            read = self._read(with_jepa, stop_at_end=bool(layouts))
            if read is None:
                break
            sid, layout, fit = read
            if layout is None:
                self._skip(fit)
                continue
            if used + len(layout) > self.seq_len:
                break  # the record opens the next row, where it is read again
            self._take(fit)
            layouts.append(layout)
            ids.append(sid)
            used += len(layout)
        if not layouts:
            return None
        row = packing.assemble_row(layouts, ids, self._configs[0])
        self.stats.rows += 1
        self.stats.tokens += used
        self.stats.jepa_pairs += len(row["pred_index"])
        return row

    def _read(
        self, with_jepa: bool, stop_at_end: bool
    ) -> tuple[int, packing.RecordLayout | None, packing.PackStats] | None:
        """(sample id, layout or None when the overlong policy skips it, its fit statistics) of
        the record at the cursor, not yet consumed. At the end of the rank's part: None if
        stop_at_end or the dataset does not loop, else the next epoch begins."""
        while self._cursor >= len(self._part):
            if stop_at_end or not self.loop:
                return None
            self._set_position(self.epoch + 1, [], 0)
        sid = int(self._part[self._cursor])
        src, views = self.record(sid)
        fit = packing.PackStats(seq_len=self.seq_len)
        return sid, packing.fit_record(views, self._configs[src], with_jepa, fit), fit

    def _take(self, fit: packing.PackStats) -> None:
        """Consumes the record at the cursor (placed in a row), counting its fit once."""
        self._count_fit(fit)
        self._cursor += 1
        self.stats.records += 1
        self._skipped_in_a_row = 0

    def _skip(self, fit: packing.PackStats) -> None:
        """Consumes the record at the cursor, skipped by the overlong policy (counted)."""
        self._count_fit(fit)
        self._cursor += 1
        self.stats.records += 1
        self._skipped_in_a_row += 1
        self._check_progress()

    def _count_fit(self, fit: packing.PackStats) -> None:
        self.stats.truncated += fit.truncated
        self.stats.skipped_overlong += fit.skipped_overlong
        self.stats.jepa_dropped_overlong += fit.jepa_dropped_overlong

    def _check_progress(self) -> None:
        """A looping dataset whose every record is skipped would loop forever: after two epochs'
        worth of records skipped in a row, nothing fits."""
        if self._skipped_in_a_row > 2 * max(self._epoch_records, 1):
            names = ", ".join(str(p) for p in self.paths)
            raise DatasetError(
                f"{names}: no {self.split} record fits a row of {self.seq_len} tokens "
                f"(data.overlong={self.overlong} skipped {self._skipped_in_a_row} records in a "
                "row, every one it read): raise data.seq_len_tokens or use data.overlong=truncate"
            )

    def next_rows(self, n: int, with_jepa: bool = True) -> list[dict[str, np.ndarray]]:
        rows = []
        for _ in range(n):
            row = self._next_row(with_jepa)
            if row is None:
                break
            rows.append(row)
        return rows

    def next_batch(self, batch_size: int, with_jepa: bool = True) -> dict[str, np.ndarray] | None:
        """`batch_size` packed rows collated (packing.collate_rows); fewer at the end of a
        non-looping split, None once it is exhausted."""
        rows = self.next_rows(batch_size, with_jepa)
        return packing.collate_rows(rows) if rows else None

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's position; combine all ranks' with `merge_states` before saving."""
        return {
            "version": STATE_VERSION, "seed": self.seed, "manifest_hash": self.manifest_hash,
            "world_size": self.world_size, "rank": self.rank, "epoch": self.epoch,
            "layers": self._layers, "cursor": self._cursor, "part_len": len(self._part),
            "rows": [[sid for sid, _ in items] for items in self._rows],
            "rows_mode": self._rows_mode, "carry": list(self._carry),
        }  # fmt: skip

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        states = sorted(states, key=lambda s: s["rank"])
        w = states[0]["world_size"]
        if [s["rank"] for s in states] != list(range(w)) or any(
            s["world_size"] != w for s in states
        ):
            raise ValueError(f"merge_states needs one state per rank of world size {w}")
        keep = ("epoch", "layers", "cursor", "part_len", "rows", "rows_mode", "carry")
        return {
            "version": STATE_VERSION, "seed": states[0]["seed"],
            "manifest_hash": states[0]["manifest_hash"], "world_size": w,
            "ranks": [{k: s[k] for k in keep} for s in states],
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if "ranks" not in state:
            raise ValueError("load_state_dict expects a state from PackedDataset.merge_states")
        if state.get("version") != STATE_VERSION:
            raise DatasetError(
                f"the data position was saved by data-state version {state.get('version')}, whose "
                f"epoch orders differ from this version's ({STATE_VERSION}): set "
                "checkpoint.allow_data_change=true to resume the model with the data order "
                "restarting at epoch 0"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"data state was saved with seed {state['seed']}, this dataset uses {self.seed}"
            )
        ranks = state["ranks"]
        if state["world_size"] == self.world_size:
            mine = ranks[self.rank]
            self._set_position(mine["epoch"], mine["layers"], mine["cursor"])
            # Packed rows not yet emitted, rebuilt as they were: bit-exact continuation.
            mode = mine.get("rows_mode")
            self._rows = [[(sid, self._layout(sid, mode)) for sid in row]
                          for row in mine.get("rows", [])]  # fmt: skip
            self._rows_mode, self._carry = mode, list(mine.get("carry", []))
            return
        epoch = min(r["epoch"] for r in ranks)
        behind = next(r for r in ranks if r["epoch"] == epoch)
        cursors = [r["cursor"] if r["epoch"] == epoch else r["part_len"] for r in ranks]
        layer = {"world_size": state["world_size"], "cursors": cursors}
        self._set_position(epoch, [*behind["layers"], layer], 0)
        # Records the old ranks had read but not emitted (this epoch's only: a rank already in
        # the next one sees those again there) are shared out among the new ranks, once each.
        pending = [sid for r in ranks if r["epoch"] == epoch
                   for sid in [*r.get("carry", []), *(s for row in r.get("rows", []) for s in row)]]  # fmt: skip
        mine = pending[self.rank :: self.world_size]
        mode = bool(behind.get("rows_mode"))
        self._rows = [[(sid, self._layout(sid, mode))] for sid in mine]  # re-packed when read
        self._rows_mode = None if mine else mode
