"""Prints packed rows decoded back to text, one line per segment, to see what the model sees.

python -m data_pipeline.show SHARDS_DIR [--rows 2] [--seq_len 256] [--predictor_tokens 1]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from data_pipeline.dataset import PackedDataset
from data_pipeline.shards import ShardError


def describe_row(row: dict[str, np.ndarray], tok) -> list[str]:
    seg = row["segment_ids"]
    lines = []
    for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        start, end = int(idx[0]), int(idx[-1]) + 1
        pos = row["position_ids"][start:end]
        extra = ""
        if row["attend_end"][start] > row["attend_start"][start]:
            extra = f" +attends [{row['attend_start'][start]},{row['attend_end'][start]})"
        n_loss = int((row["labels"][start:end] >= 0).sum())
        text = tok.decode(row["input_ids"][start:end].tolist())
        lines.append(f"  seg {s:>2} [{start:>4},{end:>4}) pos {pos[0]}..{pos[-1]}{extra} "
                     f"lm_targets={n_loss}: {text!r}")  # fmt: skip
    for p, t, s in zip(row["pred_index"], row["target_index"], row["source_index"]):
        lines.append(f"  pair: Enc(A)@{s}  Pred(Enc(A))@{p}  Enc(B)@{t}")
    n_pad = int((seg == 0).sum())
    lines.append(f"  padding: {n_pad} of {len(seg)} tokens")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.show", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folder")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--predictor_tokens", type=int, default=1)
    parser.add_argument("--split", default="train")
    parser.add_argument("--no_jepa", action="store_true", help="LM-only rows")
    args = parser.parse_args(argv)
    try:
        ds = PackedDataset(args.folder, seq_len=args.seq_len, predictor_tokens=args.predictor_tokens,
                           split=args.split)  # fmt: skip
    except (ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(ds.tokenizer_dir)
    for i, row in enumerate(ds.next_rows(args.rows, with_jepa=not args.no_jepa)):
        print(f"row {i}: records {row['sample_ids'].tolist()}")
        print("\n".join(describe_row(row, tok)))
    print(f"non-padding fraction: {ds.stats.non_padding_fraction:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
