"""Single-pass JEPA packing: records → rows of `seq_len` tokens. Pure functions, no I/O.

Per record (views v0..vN-1, token ids without specials) the row gets, in this order:

    LM document     [bos] v0 [sep] v1 … [eos]      positions 0..L-1, causal inside itself
    view segments   [bos] vj   for each j ≠ 0 used by a JEPA pair, positions restart at 0
    predictors      [P1..Pk]   for each distinct source view s, positions continue after
                               [bos] vs and it attends to those tokens (causally to itself)

Because the model is causal, the hidden state at the last token of v0 inside the LM document is
exactly Enc(v0) computed alone, so view 0 needs no copy. Enc(vj) is read at the last token of its
view segment, Pred(Enc(vs)) at the last predictor (or at Enc(vs) when k = 0). Full rules and the
row format: data_pipeline/README.md ("Packing").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

IGNORE_INDEX = -100
PairMode = Literal["first", "chain", "all_from_first"]
OverlongPolicy = Literal["truncate", "skip"]

# Fixed-length (seq_len,) fields of a row and their dtypes.
ROW_FIELDS = {
    "input_ids": np.int64,
    "position_ids": np.int64,
    "segment_ids": np.int32,  # 0 = padding, segments numbered 1.. in row order
    "attend_start": np.int32,  # extra keys [attend_start, attend_end) visible to this query,
    "attend_end": np.int32,  # besides its own segment (predictor tokens only)
    "labels": np.int64,  # next-token target of position t, or IGNORE_INDEX
}
# Variable-length fields: per JEPA pair, row positions where embeddings are read.
PAIR_FIELDS = ("pred_index", "target_index", "source_index")


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    view_sep: int
    predictors: tuple[int, ...]


@dataclass(frozen=True)
class PackingConfig:
    seq_len: int
    specials: SpecialIds
    predictor_tokens: int = 1
    """k: predictor tokens appended after the source view; 0 makes Pred the identity."""
    jepa: bool = True
    """Emit view and predictor segments; False gives LM-only rows (baselines, loss dropout)."""
    pairs: PairMode = "first"
    """first: 0→1; chain: i→i+1; all_from_first: 0→j for every j ≥ 1."""
    lm_views: tuple[int, ...] | None = None
    """Views forming the LM document, in order, view 0 first; None = all views."""
    lm_loss_views: tuple[int, ...] | None = None
    """Views whose tokens (and the separator/eos closing them) carry LM loss; None = lm_views."""
    overlong: OverlongPolicy = "truncate"
    """A record whose LM document alone exceeds seq_len: truncate it to seq_len (LM only) or skip."""
    unlabelled_readout: bool = False
    """On records laid out with JEPA segments, the view closers (separator, eos) are not LM
    targets, so no position read as an embedding carries LM loss (jepa.readout=paper)."""

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.predictor_tokens < 0:
            raise ValueError(f"predictor_tokens must be >= 0, got {self.predictor_tokens}")
        if self.predictor_tokens > len(self.specials.predictors):
            raise ValueError(
                f"predictor_tokens={self.predictor_tokens} but the tokenizer has only "
                f"{len(self.specials.predictors)} predictor tokens"
            )
        if self.lm_views is not None and (not self.lm_views or self.lm_views[0] != 0):
            raise ValueError(f"lm_views must start with view 0, got {self.lm_views}")
        if self.lm_views is not None and self.lm_loss_views is not None:
            if not set(self.lm_loss_views) <= set(self.lm_views):
                raise ValueError(
                    f"lm_loss_views {self.lm_loss_views} must be a subset of lm_views {self.lm_views}"
                )


@dataclass
class PackStats:
    seq_len: int = 1
    records: int = 0
    rows: int = 0
    tokens: int = 0  # non-padding tokens
    jepa_pairs: int = 0
    jepa_dropped_overlong: int = 0  # records whose JEPA segments were left out for length
    truncated: int = 0
    skipped_overlong: int = 0

    @property
    def non_padding_fraction(self) -> float:
        return self.tokens / max(1, self.rows * self.seq_len)


def jepa_pairs(n_views: int, mode: PairMode) -> list[tuple[int, int]]:
    if n_views < 2:
        return []
    if mode == "first":
        return [(0, 1)]
    if mode == "chain":
        return [(i, i + 1) for i in range(n_views - 1)]
    if mode == "all_from_first":
        return [(0, j) for j in range(1, n_views)]
    raise ValueError(f"unknown pair mode {mode!r}")


@dataclass
class RecordLayout:
    """One record's segments, with positions relative to the record's first token."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    segment: np.ndarray  # 0-based segment number inside the record
    attend_start: np.ndarray
    attend_end: np.ndarray
    labels: np.ndarray
    pairs: list[tuple[int, int, int]]  # (pred_index, target_index, source_index)
    doc_len: int  # length of the LM document (the record's first segment)

    def __len__(self) -> int:
        return len(self.input_ids)


def layout_record(views: Sequence[np.ndarray], cfg: PackingConfig, with_jepa: bool) -> RecordLayout:
    sp = cfg.specials
    lm_views = cfg.lm_views if cfg.lm_views is not None else tuple(range(len(views)))
    loss_views = set(cfg.lm_loss_views if cfg.lm_loss_views is not None else lm_views)
    lm_views = [j for j in lm_views if j < len(views)]

    # LM document: [bos] v_a [sep] v_b … [eos]; `owner` says which view a token belongs to, the
    # separator/eos closing a view belonging to it (so it is learned where that view is learned).
    ids, owner = [sp.bos], [-1]
    for n, j in enumerate(lm_views):
        ids.extend(int(t) for t in views[j])
        ids.append(sp.eos if n == len(lm_views) - 1 else sp.view_sep)
        owner.extend([j] * (len(views[j]) + 1))
    doc_len = len(ids)
    owner_arr = np.asarray(owner)
    labels = np.full(doc_len, IGNORE_INDEX, dtype=np.int64)
    target_in_loss = np.isin(owner_arr[1:], list(loss_views))
    if with_jepa and cfg.unlabelled_readout and jepa_pairs(len(views), cfg.pairs):
        # Enc(v0) is read where v0's closer is predicted: no closer is a target on this record
        target_in_loss &= ~np.isin(np.asarray(ids[1:]), [sp.view_sep, sp.eos])
    labels[:-1] = np.where(target_in_loss, np.asarray(ids[1:]), IGNORE_INDEX)

    positions = list(range(doc_len))
    segment = [0] * doc_len
    att_s, att_e = [0] * doc_len, [0] * doc_len
    pairs: list[tuple[int, int, int]] = []

    if with_jepa:
        pair_list = jepa_pairs(len(views), cfg.pairs)
        # read[j]: (index of Enc(vj), start of [bos] vj) inside the record.
        read = {0: (len(views[0]), 0)}
        for j in sorted({v for p in pair_list for v in p} - {0}):
            start = len(ids)
            seg = [sp.bos, *(int(t) for t in views[j])]
            ids.extend(seg)
            positions.extend(range(len(seg)))
            segment.extend([segment[-1] + 1] * len(seg))
            att_s.extend([0] * len(seg))
            att_e.extend([0] * len(seg))
            read[j] = (start + len(seg) - 1, start)
        k = cfg.predictor_tokens
        pred_read = {}
        for s in sorted({p[0] for p in pair_list}):
            enc_idx, src_start = read[s]
            if k == 0:
                pred_read[s] = enc_idx
                continue
            src_len = enc_idx - src_start + 1  # [bos] vs
            ids.extend(sp.predictors[:k])
            positions.extend(range(src_len, src_len + k))
            segment.extend([segment[-1] + 1] * k)
            att_s.extend([src_start] * k)
            att_e.extend([src_start + src_len] * k)
            pred_read[s] = len(ids) - 1
        pairs = [(pred_read[s], read[t][0], read[s][0]) for s, t in pair_list]

    n = len(ids)
    full_labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    full_labels[:doc_len] = labels
    return RecordLayout(
        input_ids=np.asarray(ids, dtype=np.int64),
        position_ids=np.asarray(positions, dtype=np.int64),
        segment=np.asarray(segment, dtype=np.int32),
        attend_start=np.asarray(att_s, dtype=np.int32),
        attend_end=np.asarray(att_e, dtype=np.int32),
        labels=full_labels,
        pairs=pairs,
        doc_len=doc_len,
    )


def fit_record(
    views: Sequence[np.ndarray], cfg: PackingConfig, with_jepa: bool, stats: PackStats
) -> RecordLayout | None:
    """The record's layout within seq_len per the overlong policy, or None when it is skipped."""
    layout = layout_record(views, cfg, with_jepa)
    if len(layout) <= cfg.seq_len:
        return layout
    had_pairs = with_jepa and bool(layout.pairs)
    if had_pairs:
        layout = layout_record(views, cfg, with_jepa=False)
        if len(layout) <= cfg.seq_len:
            stats.jepa_dropped_overlong += 1
            return layout
    if cfg.overlong == "skip":
        stats.skipped_overlong += 1
        return None
    stats.truncated += 1
    stats.jepa_dropped_overlong += had_pairs  # a truncated record keeps no JEPA segments
    T = cfg.seq_len
    labels = layout.labels[:T].copy()
    labels[-1] = IGNORE_INDEX  # its target was cut off
    return RecordLayout(
        input_ids=layout.input_ids[:T], position_ids=layout.position_ids[:T],
        segment=layout.segment[:T], attend_start=layout.attend_start[:T],
        attend_end=layout.attend_end[:T], labels=labels, pairs=[], doc_len=T,
    )  # fmt: skip


def assemble_row(
    layouts: Sequence[RecordLayout], sample_ids: Sequence[int], cfg: PackingConfig
) -> dict[str, np.ndarray]:
    """Concatenates record layouts into one row, padded to seq_len."""
    T = cfg.seq_len
    row = {name: np.zeros(T, dtype=dt) for name, dt in ROW_FIELDS.items()}
    row["input_ids"][:] = cfg.specials.pad
    row["labels"][:] = IGNORE_INDEX
    pairs, doc_spans = [], []
    offset, next_segment = 0, 1
    for lay in layouts:
        n = len(lay)
        sl = slice(offset, offset + n)
        row["input_ids"][sl] = lay.input_ids
        row["position_ids"][sl] = lay.position_ids
        row["segment_ids"][sl] = lay.segment + next_segment
        extra = lay.attend_end > lay.attend_start
        row["attend_start"][sl] = np.where(extra, lay.attend_start + offset, 0)
        row["attend_end"][sl] = np.where(extra, lay.attend_end + offset, 0)
        row["labels"][sl] = lay.labels
        pairs.extend((p + offset, t + offset, s + offset) for p, t, s in lay.pairs)
        doc_spans.append((offset, offset + lay.doc_len))
        offset += n
        next_segment += int(lay.segment.max()) + 1
    pair_arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 3)
    for i, name in enumerate(PAIR_FIELDS):
        row[name] = pair_arr[:, i].copy()
    row["doc_spans"] = np.asarray(doc_spans, dtype=np.int64).reshape(-1, 2)
    row["sample_ids"] = np.asarray(sample_ids, dtype=np.int64)
    return row


def pack_rows(
    records: Sequence[Sequence[np.ndarray]],
    cfg: PackingConfig,
    sample_ids: Sequence[int] | None = None,
) -> tuple[list[dict[str, np.ndarray]], PackStats]:
    """Greedy in-order packing: a record goes into the current row if it fits, else it opens the
    next row. A record never straddles two rows. Returns the rows and packing statistics."""
    if sample_ids is None:
        sample_ids = range(len(records))
    stats = PackStats(seq_len=cfg.seq_len)
    rows, cur, cur_ids, cur_len = [], [], [], 0
    for sid, views in zip(sample_ids, records):
        stats.records += 1
        layout = fit_record(views, cfg, cfg.jepa, stats)
        if layout is None:
            continue
        if cur_len + len(layout) > cfg.seq_len:
            rows.append(assemble_row(cur, cur_ids, cfg))
            cur, cur_ids, cur_len = [], [], 0
        cur.append(layout)
        cur_ids.append(sid)
        cur_len += len(layout)
    if cur:
        rows.append(assemble_row(cur, cur_ids, cfg))
    for row in rows:
        stats.tokens += int((row["segment_ids"] > 0).sum())
        stats.jepa_pairs += len(row["pred_index"])
    stats.rows = len(rows)
    return rows, stats


def best_fit(
    items: Sequence[tuple[int, RecordLayout]], seq_len: int
) -> list[list[tuple[int, RecordLayout]]]:
    """Best-fit decreasing: each (sample id, layout), the longest first (ties in the given order),
    goes into the open row it leaves the least room in, or opens a new row. Deterministic. Rows
    in the order they were opened, each row's records in the order they were placed."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][1]), i))
    rows: list[list[tuple[int, RecordLayout]]] = []
    free: list[int] = []
    for i in order:
        n = len(items[i][1])
        best = -1
        for r, room in enumerate(free):
            if n <= room and (best < 0 or room < free[best]):
                best = r
        if best < 0:
            rows.append([])
            free.append(seq_len)
            best = len(rows) - 1
        rows[best].append(items[i])
        free[best] -= n
    return rows


def best_fit_window(
    items: Sequence[tuple[int, RecordLayout]], seq_len: int, hold_back: bool
) -> tuple[list[list[tuple[int, RecordLayout]]], list[tuple[int, RecordLayout]]]:
    """(rows, held back): best_fit of a window of records; with hold_back (more records will
    follow) and more than one row, the emptiest row's records are held back, to be packed with
    the next window's, rather than emitted padded."""
    rows = best_fit(items, seq_len)
    if not hold_back or len(rows) < 2:
        return rows, []
    emptiest = min(range(len(rows)), key=lambda r: sum(len(lay) for _, lay in rows[r]))
    return rows, rows.pop(emptiest)


def pack_best_fit(
    items: Sequence[tuple[int, RecordLayout]], seq_len: int, window_rows: int
) -> list[list[tuple[int, RecordLayout]]]:
    """All (sample id, layout) items in rows, window by window as the dataset packs them: each
    window holds window_rows rows' worth of tokens (the held-back records of the last one
    first), packed by best_fit_window."""
    rows, held, i = [], [], 0
    while i < len(items) or held:
        window, budget = list(held), window_rows * seq_len - sum(len(lay) for _, lay in held)
        while i < len(items) and budget > 0:
            window.append(items[i])
            budget -= len(items[i][1])
            i += 1
        done, held = best_fit_window(window, seq_len, hold_back=i < len(items))
        rows.extend(done)
    return rows


def attention_allowed(row: dict[str, np.ndarray]) -> np.ndarray:
    """(T, T) bool: may query q attend to key k. Reference definition, used by tests and the
    dense CPU mask: same segment and causal, or inside the query's extra key range. Padding
    (segment 0) attends causally to padding, so no query row is empty."""
    seg = row["segment_ids"]
    q = np.arange(len(seg))[:, None]
    k = np.arange(len(seg))[None, :]
    same = (seg[:, None] == seg[None, :]) & (k <= q)
    extra = (k >= row["attend_start"][:, None]) & (k < row["attend_end"][:, None])
    return same | extra


def collate_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks rows into a batch. Pair indices become flat (batch_index, position) arrays."""
    batch = {name: np.stack([r[name] for r in rows]) for name in ROW_FIELDS}
    for name in PAIR_FIELDS:
        batch[name] = np.concatenate([r[name] for r in rows])
    batch["pair_batch_index"] = np.concatenate(
        [np.full(len(r["pred_index"]), b, dtype=np.int64) for b, r in enumerate(rows)]
    )
    batch["doc_spans"] = (
        np.concatenate(
            [
                np.column_stack([np.full(len(r["doc_spans"]), b), r["doc_spans"]])
                for b, r in enumerate(rows)
            ]
        )
        .astype(np.int64)
        .reshape(-1, 3)
    )  # (D, 3): batch index, start, end
    batch["sample_ids"] = np.concatenate([r["sample_ids"] for r in rows])
    return batch
