#!/usr/bin/env bash
# Launch `attanchor fit` on this machine, on several nodes, or under SLURM.
# Environment and launcher only: every hyperparameter lives in the recipe.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./launch.sh RECIPE.yaml [--key value ...]

Runs `python -m attanchor.cli fit --config RECIPE.yaml [--key value ...]` with one process per
GPU (or NPROC_PER_NODE CPU processes when there is no GPU). The launcher adds
`--trainer.accelerator`, `--trainer.devices` and `--trainer.num_nodes` for the topology it
starts, before your overrides (which win).

How it launches:
  SLURM_JOB_ID set      srun, one task per process (request them with sbatch
                        --nodes=N --ntasks-per-node=GPUS); run launch.sh once, from the batch
                        script, not under srun.
  NNODES > 1            torchrun rendezvous with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT;
                        run launch.sh once on every node.
  one node, > 1 process torchrun --standalone.
  one process           python directly.

The global batch: a recipe states the batch per optimizer step over all processes
(data.global_batch_size, the paper's figure); `attanchor fit` derives gradient accumulation =
global / (NNODES x processes per node x data.batch_size) and records it in the run
directory's run.json. A topology whose product does not divide the global batch stops with
an error naming the numbers: pass a smaller --data.batch_size (per device).

Environment variables:
  GPUS_PER_NODE    processes (GPUs) per node; default: the visible GPUs (CUDA_VISIBLE_DEVICES,
                   else nvidia-smi -L), 0 means CPU.
  NPROC_PER_NODE   CPU processes per node when there is no GPU (default 1).
  NNODES           number of nodes (default 1; under SLURM: SLURM_JOB_NUM_NODES).
  NODE_RANK        this node's rank, 0..NNODES-1 (default 0).
  MASTER_ADDR      address of node 0 (required when NNODES > 1).
  MASTER_PORT      port on node 0 (default 29500).
  PYTHON           the Python interpreter (default: python).
  DRY_RUN=1        print the command instead of running it.

Pre-emption and requeue (SLURM): the run is started with `--run.resume auto`, so a start
finding the run's checkpoints/last.ckpt continues from it. SIGTERM or SIGUSR1 (request it
with `sbatch --signal=B:USR1@90`: to this script, which forwards it to srun, or
`--signal=USR1@90`: to every task) makes `attanchor fit` write last.ckpt at the current step
and exit with code 75; this script then runs `scontrol requeue $SLURM_JOB_ID` (array jobs:
JOBID_TASKID) and exits 0, and the requeued job resumes. Any other exit code is passed on.

Examples:
  ./launch.sh recipes/demo/anchored.yaml
  NPROC_PER_NODE=2 ./launch.sh recipes/demo/anchored.yaml --trainer.strategy ddp
  ./launch.sh recipes/llava-1.5-7b/zero3-lora-anchored.yaml        # 8 GPUs: 8 x 4 x 1 = 32
  # 2 nodes x 8 GPUs, on each node (NODE_RANK 0 and 1): 16 x 2 x 1 = 32
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./launch.sh \
    recipes/llava-1.5-7b/zero3-lora-anchored.yaml --data.batch_size 2
  sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --wrap \
    "./launch.sh recipes/llava-1.5-7b/zero3-lora-anchored.yaml --data.batch_size 2"
EOF
}

die() {
  echo "launch.sh: $*" >&2
  exit 2
}

is_count() {
  [[ $1 =~ ^[0-9]+$ ]]
}

count_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    # An empty list or "-1" hides every GPU.
    if [[ -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1* ]]; then
      echo 0
    else
      local -a ids
      IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
      echo "${#ids[@]}"
    fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
case $1 in
  -h | --help)
    usage
    exit 0
    ;;
esac

recipe=$1
shift
[[ -f $recipe ]] || die "recipe '$recipe' not found (give a path such as recipes/demo/anchored.yaml)"

python_bin=${PYTHON:-python}
gpus=${GPUS_PER_NODE:-$(count_gpus)}
is_count "$gpus" || die "GPUS_PER_NODE='$gpus' is not a count"

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  nnodes=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
else
  nnodes=${NNODES:-1}
fi
if ! is_count "$nnodes" || ((nnodes < 1)); then
  die "NNODES='$nnodes' must be a count >= 1"
fi

if ((gpus > 0)); then
  accelerator=gpu
  nproc=$gpus
else
  accelerator=cpu
  nproc=${NPROC_PER_NODE:-1}
  if ! is_count "$nproc" || ((nproc < 1)); then
    die "NPROC_PER_NODE='$nproc' must be a count >= 1"
  fi
fi

fit_args=(
  fit --config "$recipe"
  --trainer.accelerator "$accelerator"
  --trainer.devices "$nproc"
  --trainer.num_nodes "$nnodes"
  "$@"
)

PREEMPTED=75 # attanchor.train.resilience.PREEMPTED_EXIT_CODE

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  # SLURM starts every process; Lightning reads ranks and the rendezvous from SLURM_*.
  # resume auto first, so a user's --run.resume still wins.
  fit_args=("${fit_args[@]:0:3}" --run.resume auto "${fit_args[@]:3}")
  cmd=(srun --kill-on-bad-exit=1 "$python_bin" -m attanchor.cli "${fit_args[@]}")
elif ((nnodes > 1)); then
  [[ -n ${MASTER_ADDR:-} ]] || die "NNODES=$nnodes needs MASTER_ADDR (the address of node 0)"
  node_rank=${NODE_RANK:-0}
  if ! is_count "$node_rank" || ((node_rank >= nnodes)); then
    die "NODE_RANK='$node_rank' must lie in 0..$((nnodes - 1))"
  fi
  cmd=("$python_bin" -m torch.distributed.run
    --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}"
    -m attanchor.cli "${fit_args[@]}")
elif ((nproc > 1)); then
  cmd=("$python_bin" -m torch.distributed.run --standalone --nproc_per_node "$nproc"
    -m attanchor.cli "${fit_args[@]}")
else
  cmd=("$python_bin" -m attanchor.cli "${fit_args[@]}")
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  exec "${cmd[@]}"
fi

# SLURM: run srun as a child, forward pre-emption signals to it, requeue on exit code 75.
signalled=""
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  signalled=$1
  echo "launch.sh: SIG$1: asking the run to checkpoint and stop" >&2
  kill -s "$1" "$child" 2>/dev/null || true
}
"${cmd[@]}" &
child=$!
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do # wait returned early: a trapped signal arrived
  rc=0
  wait "$child" || rc=$?
done
trap - USR1 TERM
if ((rc == PREEMPTED)); then
  job=$SLURM_JOB_ID
  if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  fi
  echo "launch.sh: the run stopped at a checkpoint${signalled:+ (SIG$signalled)}: requeueing job $job" >&2
  scontrol requeue "$job" || die "scontrol requeue $job failed: resubmit the job; it resumes from last.ckpt"
  exit 0
fi
exit "$rc"
