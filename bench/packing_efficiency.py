"""Non-padding share of packed rows, in-order greedy packing against best-fit over a window:
`python bench/packing_efficiency.py [SHARDS_DIR]`.

1. The bundled corpus (or SHARDS_DIR) through PackedDataset, one epoch, LLM-JEPA rows (k = 1),
   at several row lengths: `packing_window=0` (in order) against the default window.
2. A synthetic long-tailed mix at 4096 tokens: 20,000 two-view records, each view's length
   log-normal (median 150 tokens, σ = 1.2, clipped to 1..3000), packed LM-only and with JEPA
   segments, greedy (packing.pack_rows) against best-fit windows of 4, 16 and 64 rows of tokens.
Prints a table; nothing is timed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import packing  # noqa: E402
from data_pipeline.dataset import PackedDataset  # noqa: E402

SPECIALS = packing.SpecialIds(bos=1, eos=2, pad=0, view_sep=3, predictors=(4, 5, 6))


def corpus_share(shards: Path, seq_len: int, window: int) -> float:
    ds = PackedDataset(shards, seq_len=seq_len, predictor_tokens=1, seed=0, loop=False,
                       packing_window=window)  # fmt: skip
    while ds.next_batch(64) is not None:
        pass
    return ds.stats.non_padding_fraction


def synthetic_records(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(150), 1.2, size=(n, 2)).astype(int), 1, 3000)
    return [[rng.integers(8, 1000, a), rng.integers(8, 1000, b)] for a, b in lengths]


def synthetic_share(records, seq_len: int, jepa: bool, window_rows: int) -> float:
    """Non-padding share; window_rows 0: in order (packing.pack_rows), else best-fit over
    windows of that many rows' worth of tokens, the emptiest row held back (as the dataset)."""
    cfg = packing.PackingConfig(seq_len, SPECIALS, predictor_tokens=1, jepa=jepa)
    if window_rows == 0:
        _, stats = packing.pack_rows(records, cfg)
        return stats.non_padding_fraction
    stats = packing.PackStats(seq_len=seq_len)
    layouts = [packing.fit_record(views, cfg, jepa, stats) for views in records]
    items = [(i, lay) for i, lay in enumerate(layouts) if lay is not None]
    rows = packing.pack_best_fit(items, seq_len, window_rows)
    return sum(len(lay) for row in rows for _, lay in row) / (len(rows) * seq_len)


def main(shards: str | None = None) -> None:
    if shards is None:
        from engine_overhead import build_shards  # the bundled corpus, tokenized once

        shards = build_shards(Path(tempfile.mkdtemp(prefix="packing-")))
    print("| data | row tokens | in order | best-fit, window of 16 rows |")
    print("|---|---:|---:|---:|")
    for seq_len in (256, 1024, 2048):
        greedy = corpus_share(Path(shards), seq_len, 0)
        best = corpus_share(Path(shards), seq_len, 16)
        print(f"| bundled NL-RX-SYNTH, JEPA rows | {seq_len} | {greedy:.1%} | {best:.1%} |")
    records = synthetic_records(20000)
    print()
    print("| synthetic long-tailed, 4096 | in order | window 4 rows | 16 rows | 64 rows |")
    print("|---|---:|---:|---:|---:|")
    for jepa in (False, True):
        shares = [synthetic_share(records, 4096, jepa, w) for w in (0, 4, 16, 64)]
        name = "JEPA rows" if jepa else "LM-only rows"
        print(f"| {name} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fire

    fire.Fire(main)
