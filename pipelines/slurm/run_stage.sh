#!/usr/bin/env bash
# Runs one kd3 stage inside a Slurm allocation; sourced by the per-stage *.sbatch files (or run by hand
# inside `salloc`). Usage: run_stage.sh STAGE [extra kd3 arguments, e.g. key=value overrides]
#
# Environment (all optional except where a default does not fit):
#   KD3_REPO        the kd3 checkout (default: the folder sbatch was called from)
#   KD3_PYTHON      the interpreter with kd3 installed (default: $KD3_REPO/.venv/bin/python)
#   CONFIG, RUN     pipeline config and run folder (default pipelines/demo.yaml, runs/demo); the run
#                   folder must be on a file system every node sees
#   NPROC_PER_NODE  processes per node for score/train/evaluate (default: the GPUs Slurm gave the node,
#                   else 1)
#   MASTER_PORT     rendezvous port on the first node (default 29500)
#
# score, train and evaluate run through torchrun, one launcher per node (srun --ntasks-per-node=1), with
# a c10d rendezvous on the allocation's first node; every other stage runs once, on one node. Every
# stage runs with --resume, so a requeued job continues where it stopped. When kd3 stopped because
# Slurm asked it to (SIGTERM/SIGUSR1 before preemption or the time limit: meta.json says "Preempted";
# torchrun itself reports a worker's exit 75 as a failure), the job is requeued with the same id, so
# `--dependency=afterok` chains (submit_chain.sh) keep waiting for it.
set -uo pipefail

stage=${1:?usage: run_stage.sh STAGE [kd3 arguments]}
shift
repo=${KD3_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
python=${KD3_PYTHON:-$repo/.venv/bin/python}
config=${CONFIG:-pipelines/demo.yaml}
run=${RUN:-runs/demo}
nodes=${SLURM_JOB_NUM_NODES:-1}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
port=${MASTER_PORT:-29500}
cd "$repo" || { echo "run_stage.sh: KD3_REPO $repo: no such folder" >&2; exit 2; }
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

kd3_args=("$stage" --config "$config" --run-dir "$run" --resume "$@")
case "$stage" in
  score|train|evaluate)
    first_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?run inside a Slurm allocation}" | head -n 1)
    cmd=(srun --nodes "$nodes" --ntasks-per-node 1 "$python" -m torch.distributed.run
         --nnodes "$nodes" --nproc_per_node "$nproc"
         --rdzv-backend c10d --rdzv-endpoint "$first_node:$port" --rdzv-id "kd3-${SLURM_JOB_ID:-0}-$stage"
         -m kd3.cli "${kd3_args[@]}") ;;
  *)
    cmd=(srun --nodes 1 --ntasks 1 "$python" -m kd3.cli "${kd3_args[@]}") ;;
esac
echo "run_stage.sh: ${cmd[*]}"
"${cmd[@]}"
status=$?

# the stage's own folder name (train.output=… moves train; preempted is what matters here)
meta="$run/$stage/meta.json"
for arg in "$@"; do
  case "$arg" in train.output=*) meta="$run/${arg#train.output=}/meta.json" ;; esac
done
if [ "$status" -ne 0 ] && [ -f "$meta" ] && grep -q '"error": "Preempted' "$meta"; then
  echo "run_stage.sh: $stage was preempted (see $meta); requeueing job ${SLURM_JOB_ID:-?} to resume it"
  scontrol requeue "${SLURM_JOB_ID:?}"
  exit 0
fi
exit "$status"
