#!/usr/bin/env bash
# Submits the pipeline's stages as a chain of Slurm jobs, each starting when the one before succeeded
# (--dependency=afterok); a preempted stage requeues itself under the same job id (run_stage.sh), so
# the chain waits for it. Run from the kd3 checkout:
#   CONFIG=pipelines/cifar_web.yaml RUN=/shared/runs/c bash pipelines/slurm/submit_chain.sh [STAGE …]
# Default stages: download score dedup select train average evaluate inspect. Extra sbatch options for
# every job: SBATCH_ARGS="--account=… --partition=…". Prints one "stage job-id" line per job.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(download score dedup select train average evaluate inspect)
export KD3_REPO=$repo CONFIG=${CONFIG:-pipelines/demo.yaml} RUN=${RUN:-runs/demo}
previous=""
for stage in "${stages[@]}"; do
  [ -f "$here/$stage.sbatch" ] || { echo "submit_chain.sh: no template $here/$stage.sbatch" >&2; exit 2; }
  dependency=()
  [ -n "$previous" ] && dependency=(--dependency "afterok:$previous")
  # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
  previous=$(sbatch --parsable --export ALL ${SBATCH_ARGS:-} "${dependency[@]}" "$here/$stage.sbatch")
  previous=${previous%%;*}  # --parsable prints "id[;cluster]"
  echo "$stage $previous"
done
