#!/bin/bash
# Multi-node pretraining: one DeepSpeed launcher per node (srun), GPUS_PER_NODE ranks each.
#
#   sbatch [--nodes N] [--time 24:00:00] slurm/pretrain.sh CONFIG [dotted.key=value ...]
#   sbatch --nodes 4 slurm/pretrain.sh recipes/llama_1b.yaml data.paths=[/data/shards/web] optim.lr=3e-4
#
# CONFIG and the overrides are forwarded unchanged to pretrain/main.py. Submit from the repository
# root (or set REPO). A run folder that holds checkpoints is resumed automatically, so resubmitting
# the same command continues the run, and so does the requeued job after a preemption warning.
#
# Knobs (environment variables, with defaults):
#   REPO           repository root                               [$SLURM_SUBMIT_DIR]
#   VENV           virtual environment to activate, "" = none    [$REPO/.venv if it exists]
#   GPUS_PER_NODE  ranks per node                                [$SLURM_GPUS_ON_NODE, else nvidia-smi's count, else 1]
#   MASTER_ADDR    rendezvous host                               [first host of the allocation]
#   MASTER_PORT    rendezvous port                               [20000 + job id % 20000]
#   RUN_DIR        run folder: checkpoints, TensorBoard, logs    [run_dir=… among the overrides, else runs/<config name>]
#   LAUNCHER_ARGS  extra `deepspeed` launcher options            [] e.g. "--bind_cores_to_rank"
#   SRUN_ARGS      extra srun options of the launcher step       [] e.g. "--container-image=…"
#   STEP_WAIT_S    after the first node's launcher exits, the others get this long, then are killed [120]
#   MAX_REQUEUES   preemption requeues before giving up          [50]
#   CACHE_ROOT     node-local folder of the compiler caches below [${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/llm-jepa-$USER]
#   TORCH_EXTENSIONS_DIR, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR  [$CACHE_ROOT/{torch_extensions,triton,inductor}]
#
# Logs: RUN_DIR/logs/job_<jobid>[_restart<k>]/ holds job.log (this script, the whole job),
# launcher.node<i>.log (each node's launcher) and <timestamp>_rank<r>.log (each rank).
#
# Preemption (slurm/README.md): Slurm sends USR1 to this script PREEMPT_WARNING_S before the time
# limit (`#SBATCH --signal` below; by hand: scancel --signal=USR1 --batch JOBID). The script
# forwards it to the launcher step; every rank sets a flag, the ranks agree within
# checkpoint.preempt_check_every_steps steps (all-reduce), save a checkpoint and exit with
# PREEMPT_EXIT_CODE (75, EX_TEMPFAIL, pretrain/preemption.py); the script then runs `scontrol requeue`, and the job starts again, same
# job id, resuming from that checkpoint. A plain `scancel` (SIGTERM) also checkpoints if there is
# time, but never requeues.
#
#SBATCH --job-name=llm-jepa
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail

if (( $# < 1 )); then
    echo "usage: sbatch [--nodes N] slurm/pretrain.sh CONFIG [dotted.key=value ...]" >&2
    exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "error: submit with sbatch (no SLURM_JOB_ID): sbatch slurm/pretrain.sh $*" >&2
    exit 2
fi
CONFIG=$1
shift

# USR1 (the preemption warning) is handled by this script and by the ranks only: every launcher
# in between ignores it (`trap '' USR1` is inherited through exec and fork; the ranks install their
# own handler). srun forwards it to every process of the step. It is sent again every 10 s until
# the step ends, in case it first came while the ranks were still starting (and ignoring it).
preempted=0
last_forward=0
on_usr1() {
    preempted=1
    echo "[pretrain.sh] $(date -Is) preemption warning (USR1): forwarding to the ranks"
    forward_usr1
}
# A launcher task ignores USR1 only once its `trap '' USR1` has run: a signal in the first moments
# of the step would kill it (the job then FAILS instead of requeueing). So nothing is forwarded
# in the step's first STEP_SETTLE_S seconds; the loop below forwards it as soon as they are over.
STEP_SETTLE_S=5
step_started=0
forward_usr1() {
    if [[ -n "${step_pid:-}" ]] && (( SECONDS - step_started >= STEP_SETTLE_S )); then
        last_forward=$SECONDS
        kill -USR1 "$step_pid" 2>/dev/null
    fi
}
trap on_usr1 USR1
PREEMPT_EXIT_CODE=75  # = pretrain.preemption.PREEMPT_EXIT_CODE (a test checks they agree)

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || exit 2
VENV=${VENV-$REPO/.venv}
if [[ -n "$VENV" && -f "$VENV/bin/activate" ]]; then source "$VENV/bin/activate"; fi

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then
        GPUS_PER_NODE=$(nvidia-smi -L | wc -l)
    else
        GPUS_PER_NODE=1
    fi
fi
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NNODES=${#HOSTS[@]}
export MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}
SRUN_ARGS=${SRUN_ARGS:-}
STEP_WAIT_S=${STEP_WAIT_S:-120}
MAX_REQUEUES=${MAX_REQUEUES:-50}
RESTART=${SLURM_RESTART_COUNT:-0}

# The run folder: a run_dir= override wins (the last one, as in the config merge).
if [[ -z "${RUN_DIR:-}" ]]; then
    RUN_DIR=runs/$(basename "${CONFIG%.*}")
    for a in "$@"; do [[ "$a" == run_dir=* ]] && RUN_DIR=${a#run_dir=}; done
fi
LOG_DIR=$RUN_DIR/logs/job_${SLURM_JOB_ID}
(( RESTART > 0 )) && LOG_DIR+=_restart$RESTART
mkdir -p "$LOG_DIR"
exec > >(tee -a "$LOG_DIR/job.log") 2>&1

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export PYTHONUNBUFFERED=1

# Compiler caches on node-local disk (each node's srun task inherits these paths and fills its own
# copy): DeepSpeed's JIT-built ops, Triton kernels and TorchInductor graphs (flex_attention's block
# mask and kernels). On a shared $HOME, hundreds of ranks compile into one NFS folder, and a build
# killed half-way (a preemption, a time limit) leaves a lock file that every later job waits on.
CACHE_ROOT=${CACHE_ROOT:-${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/llm-jepa-${USER:-$(id -un)}}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$CACHE_ROOT/torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE_ROOT/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE_ROOT/inductor}
# Every rank memory-maps shard files and opens sockets to every peer: a default soft limit of 1024
# open files runs out on large corpora and jobs. Raise it to the hard limit (srun propagates it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || echo "[pretrain.sh] could not raise the open-file limit"
echo "[pretrain.sh] caches: extensions $TORCH_EXTENSIONS_DIR, triton $TRITON_CACHE_DIR," \
     "inductor $TORCHINDUCTOR_CACHE_DIR; open files limit $(ulimit -n)"

# DeepSpeed's hostfile from the allocation: "host slots=GPUS_PER_NODE" per node, in nodelist order,
# so the launcher on node i (SLURM_NODEID) takes global ranks i*GPUS_PER_NODE … .
HOSTFILE=$LOG_DIR/hostfile
for h in "${HOSTS[@]}"; do echo "$h slots=$GPUS_PER_NODE"; done > "$HOSTFILE"

echo "[pretrain.sh] $(date -Is) job $SLURM_JOB_ID restart $RESTART: $NNODES node(s) ${HOSTS[*]}," \
     "$GPUS_PER_NODE rank(s) each, master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
echo "[pretrain.sh] config $CONFIG $*"

# One launcher per node. --kill-on-bad-exit=0 + --wait: when one node's launcher exits (a failed
# rank, or a clean preemption exit), the others get STEP_WAIT_S to follow, then are killed: no hang.
# shellcheck disable=SC2086  # SRUN_ARGS and LAUNCHER_ARGS are lists of options
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    --kill-on-bad-exit=0 --wait="$STEP_WAIT_S" --output="$LOG_DIR/launcher.node%n.log" $SRUN_ARGS \
    bash -c 'trap "" USR1; exec deepspeed --hostfile "$1" --no_ssh --node_rank "$SLURM_NODEID" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --enable_each_rank_log "$2" \
        '"$LAUNCHER_ARGS"' pretrain/main.py "${@:3}"' \
    launcher "$HOSTFILE" "$LOG_DIR" "$CONFIG" "$@" run_dir="$RUN_DIR" &
step_pid=$!
step_started=$SECONDS
# Short sleeps rather than one `wait` on srun: the USR1 trap runs as soon as it arrives, and the
# warning can be repeated until the step is over.
while kill -0 "$step_pid" 2>/dev/null; do
    sleep 2 &
    wait $! 2>/dev/null
    if (( preempted && (last_forward == 0 || SECONDS - last_forward >= 10) )); then forward_usr1; fi
done
wait "$step_pid"
rc=$?
echo "[pretrain.sh] $(date -Is) launchers exited with $rc"

if (( preempted && rc == PREEMPT_EXIT_CODE )); then
    if (( RESTART >= MAX_REQUEUES )); then
        echo "[pretrain.sh] checkpoint saved; not requeued: $RESTART requeues already (MAX_REQUEUES)"
        exit "$rc"
    fi
    echo "[pretrain.sh] checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((RESTART + 1)))"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[pretrain.sh] scontrol requeue failed: resubmit the same command to resume" >&2
fi
exit "$rc"
