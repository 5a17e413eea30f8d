#!/usr/bin/env bash
# The main job on the bundled corpus: tokenizer → shards → verify → packed rows decoded →
# 2-process ZeRO-3 LLM-JEPA pretraining on CPU → TensorBoard events → Hugging Face export.
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

echo "== 5. pretrain: 2-process DeepSpeed ZeRO-3 LLM-JEPA run of the tiny Llama on CPU (fp32, gloo)"
STEPS=${STEPS:-1000}
rm -rf "$OUT/run"
"$(dirname "$PY")/deepspeed" --num_gpus 2 --master_port "${MASTER_PORT:-29611}" pretrain/main.py \
    recipes/tiny_cpu.yaml "data.paths=[$OUT/shards]" "run_dir=$OUT/run" \
    "schedule.train_steps=$STEPS" "checkpoint.save_every_steps=250" "logging.eval_every_steps=100"

echo "== 6. export: gather the ZeRO-3 shards into a Hugging Face model + tokenizer"
$PY -m pretrain.export "$OUT/run" "$OUT/hf_model"
echo "== 7. generate as the evaluator prompts ([bos] description [sep] → regex), on 200 test pairs"
$PY -m pretrain.evaluate "$OUT/hf_model" data/nlrx_synth/test.jsonl --predictor_tokens 1 \
    --limit 200 --show_examples 3 --progress false --out "$OUT/eval_test.json"

echo
echo "TensorBoard events: $OUT/run/tensorboard"
echo "Hugging Face model: $OUT/hf_model"
echo "View the curves:    $(dirname "$PY")/tensorboard --logdir $OUT/run/tensorboard"
