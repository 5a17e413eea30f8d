#!/bin/bash
# Preprocessing as a Slurm job array: task i tokenizes its part of the work units
# (data_pipeline.preprocess --shard_index i --shard_count N); a dependent job (afterok on the whole
# array) then writes the complete manifest.json and runs data_pipeline.verify on the output.
#
#   sbatch --array=0-7 slurm/preprocess.sh --inputs 'corpus/*.jsonl' --views messages \
#       --tokenizer TOK_DIR --out SHARDS_DIR [--max_record_tokens 2048 ...]
#
# Every argument is forwarded to `python -m data_pipeline.preprocess` (see README.md, "Preprocess");
# the script adds only --shard_index/--shard_count (and --num_workers unless given). Submit from
# the repository root (or set REPO). The first task of the array submits the final job, so one
# sbatch command does everything; its id is printed in that task's log. Reruns skip finished shards.
#
# Knobs (environment variables, with defaults):
#   REPO          repository root                          [$SLURM_SUBMIT_DIR]
#   VENV          virtual environment to activate, "" = none  [$REPO/.venv if it exists]
#   PYTHON        interpreter                              [python]
#   NUM_WORKERS   processes per task (--num_workers)       [$SLURM_CPUS_PER_TASK or 1]
#   FINAL_LOG     output file of the final job             [slurm-<jobid>.out in the submit dir]
#   FINAL_SBATCH_ARGS  extra sbatch options of the final job (partition, account, time)  []
#
#SBATCH --job-name=preprocess
#SBATCH --array=0-3
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --requeue
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
VENV=${VENV-$REPO/.venv}
if [[ -n "$VENV" && -f "$VENV/bin/activate" ]]; then source "$VENV/bin/activate"; fi
PYTHON=${PYTHON:-python}
NUM_WORKERS=${NUM_WORKERS:-${SLURM_CPUS_PER_TASK:-1}}
FINAL_SBATCH_ARGS=${FINAL_SBATCH_ARGS:-}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    echo "error: submit as a job array: sbatch --array=0-N slurm/preprocess.sh ARGS" >&2
    exit 2
fi
# Task index/count from the array range; a sparse array (--array=0,3,7) would skip units.
MIN=${SLURM_ARRAY_TASK_MIN}
COUNT=${SLURM_ARRAY_TASK_COUNT}
if (( SLURM_ARRAY_TASK_MAX - MIN + 1 != COUNT )); then
    echo "error: --array must be a contiguous range (got min $MIN max $SLURM_ARRAY_TASK_MAX count $COUNT)" >&2
    exit 2
fi
INDEX=$(( SLURM_ARRAY_TASK_ID - MIN ))

# The output folder, for the final verify.
OUT=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --out=*) OUT=${args[i]#--out=} ;;
        --out) OUT=${args[i + 1]:-} ;;
    esac
done
if [[ -z "$OUT" ]]; then echo "error: --out SHARDS_DIR is required" >&2; exit 2; fi
extra=()
[[ " $* " == *" --num_workers"* ]] || extra+=(--num_workers "$NUM_WORKERS")
[[ " $* " == *" --progress"* ]] || extra+=(--progress False)  # no progress bars in log files

# The first task submits the final job once (not again when it is requeued): afterok on the
# whole array, so it runs only when every task succeeded. It reruns preprocess as one task, which
# finds every unit done and writes manifest.json (two tasks finishing at the same moment may each
# see the other's units unfinished and leave it unwritten), then verifies everything.
if (( INDEX == 0 )) && [[ "${SLURM_RESTART_COUNT:-0}" == 0 ]]; then
    final_cmd="cd $(printf '%q' "$REPO") && $(printf '%q ' "$PYTHON" -m data_pipeline.preprocess "$@" \
        --shard_index 0 --shard_count 1 --num_workers 1 --progress False) \
        && $(printf '%q ' "$PYTHON" -m data_pipeline.verify "$OUT")"
    final_args=(--parsable --job-name="${SLURM_JOB_NAME:-preprocess}-final" --ntasks=1
                --dependency="afterok:${SLURM_ARRAY_JOB_ID}" --kill-on-invalid-dep=yes)
    [[ -n "${FINAL_LOG:-}" ]] && final_args+=(--output="$FINAL_LOG")
    # shellcheck disable=SC2206  # FINAL_SBATCH_ARGS is a list of options
    final_args+=($FINAL_SBATCH_ARGS)
    final_id=$(sbatch "${final_args[@]}" --wrap="$final_cmd")
    echo "[preprocess.sh] final job (manifest + verify): $final_id, after array job $SLURM_ARRAY_JOB_ID"
fi

echo "[preprocess.sh] task $INDEX of $COUNT on $(hostname): $*"
exec "$PYTHON" -m data_pipeline.preprocess "$@" "${extra[@]}" \
    --shard_index "$INDEX" --shard_count "$COUNT"
