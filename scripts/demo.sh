#!/usr/bin/env bash
# The main job on the bundled corpus: tokenizer → shards → verify → packed rows decoded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"

echo "== 1. tokenizer: SentencePiece BPE on every view of the bundled NL-RX-SYNTH corpus"
$PY -m data_pipeline.tokenizer train --inputs 'data/nlrx_synth/*.jsonl' --views messages \
    --out "$OUT/tokenizer" --vocab_size 2000

echo "== 2. preprocess: 2 workers → token shards + manifest (5% validation split)"
$PY -m data_pipeline.preprocess --inputs data/nlrx_synth/train.jsonl --views messages \
    --tokenizer "$OUT/tokenizer" --out "$OUT/shards" --num_workers 2 --max_record_tokens 512 \
    --val_fraction 0.05 --shard_bytes 500000

echo "== 3. verify: headers, sizes, counts, checksums"
$PY -m data_pipeline.verify "$OUT/shards"

echo "== 4. packed rows (single-pass JEPA, k=1 predictor token) decoded back to text"
$PY -m data_pipeline.show "$OUT/shards" --rows 2 --seq_len 192 --predictor_tokens 1
