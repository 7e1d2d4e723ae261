#!/usr/bin/env bash
# Merge a finished training run into a Hugging Face model folder, as a Slurm job of its own (python -m
# launcher.merge: consolidates the sharded checkpoint, merges LoRA, writes safetensors + tokenizer, verifies).
#
#   sbatch slurm/merge.sh <run directory | train job id> [merge overrides...]
#
# Submitted right after the training job, it waits for it and runs only if training succeeded:
#   jid=$(sbatch --parsable slurm/train.sh model=llama3_8b template=llama3) &&
#     sbatch --dependency=afterok:$jid slurm/merge.sh $jid
# A job id stands for slurm/train.sh's run directory outputs/slurm/<job id>. afterok waits through requeues: a
# preempted training job is not "ok" until its last attempt completes. Overrides are merge settings, e.g.
# dtype=bfloat16 lora=false (see launcher/merge.py); the result lands in <run dir>/merged/step-N.
#
# Submit from the repository root, like slurm/train.sh. One process on one node; it needs CPU memory for the
# model (no GPU): add e.g. --mem=64G --cpus-per-task=8 --partition=cpu for large models.
#SBATCH --job-name=merge
#SBATCH --nodes=1
#SBATCH --ntasks=1
# logs/ must exist before the job starts (the repository ships it).
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
set -uo pipefail

die() { echo "[merge.sh] error: $*" >&2; exit 2; }
[[ $# -ge 1 ]] || die "usage: sbatch slurm/merge.sh <run directory | train job id> [merge overrides...]"
cd "${SLURM_SUBMIT_DIR:-.}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR:-}"
[[ -d launcher ]] || die "submit from the repository root (the job runs in the submit directory, $PWD)"
PYTHON=${LAUNCHER_PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}

run=$1
shift
[[ $run =~ ^[0-9]+$ ]] && run=outputs/slurm/$run # a train job id
[[ -d $run ]] || die "$run is not a run directory (pass slurm/train.sh's job id or outputs/slurm/<job id>)"
echo "[merge.sh] $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}: merging $run" >&2
exec "$PYTHON" -m launcher.merge "$run" "$@"
