#!/usr/bin/env bash
# Fine-tune on a Slurm cluster: one launcher per node, each starting that node's workers.
#
#   sbatch [sbatch options] slurm/train.sh [hydra overrides...]
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train.sh model=llama3_8b template=llama3 backend=deepspeed_zero3
#
# Submit from the repository root (the job runs there and imports ./launcher). Every #SBATCH line below is a
# default: the same option on the sbatch command line wins. Overrides after the script name go to Hydra exactly
# as for `python -m launcher`, and win over the values this script sets (Hydra keeps the last one).
#
# The run directory is outputs/slurm/<job id> (or $LAUNCHER_RUN_DIR): keyed by the job id, which a requeued
# job keeps, so the requeued job finds its own checkpoints and resumes (resume=auto). It, the data cache
# (.cache/launcher) and this directory must be on a filesystem that every node sees.
#
# Preemption and time limits: Slurm sends USR1 to this script 300 s before the time limit (--signal below). The
# script passes it to the launchers; their workers finish the current step, write a checkpoint and exit with
# code 75; then the script requeues the job (scontrol requeue), which starts again later and continues from that
# checkpoint. SIGTERM (scancel, or preemption with PreemptMode=REQUEUE: give the partition a GraceTime long
# enough for one step and a checkpoint) makes them save the same way, but then the job ends (scancel) or Slurm
# requeues it itself (preemption): this script requeues only after USR1. Try it by hand with
#   scancel --signal=USR1 --batch <job id>
# Merge the result into a Hugging Face folder with a second job (see slurm/merge.sh and the README):
#   jid=$(sbatch --parsable slurm/train.sh ...) && sbatch --dependency=afterok:$jid slurm/merge.sh $jid
#
#SBATCH --job-name=sft
#SBATCH --nodes=1
# One task per node: the launcher. It starts one worker per GPU itself (deepspeed or accelerate launch).
#SBATCH --ntasks-per-node=1
# Whole nodes: all CPUs and memory of each node go to this job's workers.
#SBATCH --exclusive
# logs/ must exist before the job starts (the repository ships it): Slurm does not create it.
#SBATCH --output=logs/%x-%j.out
# Append, so a requeued job adds to its log instead of overwriting the first attempt's.
#SBATCH --open-mode=append
#SBATCH --requeue
# USR1 to this batch script (B:) 300 s before the time limit: time to finish a step and write a checkpoint.
# Slurm checks only every minute or so, so it may come up to a minute earlier.
#SBATCH --signal=B:USR1@300
# Typical additions on a GPU cluster (on the command line or here):
#   --gpus-per-node=8  --time=24:00:00  --partition=...  --account=...
set -uo pipefail

die() { echo "[train.sh] error: $*" >&2; exit 2; }
log() { echo "[train.sh] $(date +%H:%M:%S) $*" >&2; }
[[ -n ${SLURM_JOB_ID:-} ]] || die "submit this script with sbatch (or run it inside an allocation: salloc ... bash slurm/train.sh)"

cd "${SLURM_SUBMIT_DIR:-.}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR:-}"
[[ -d launcher && -d conf ]] || die "submit from the repository root (the job runs in the submit directory, $PWD)"
PYTHON=${LAUNCHER_PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}

# --- where the nodes meet -----------------------------------------------------------------------------------
# The first node of the allocation hosts the rendezvous; its Slurm name resolves on every node.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# A port per job, so jobs sharing a node never collide: 20000-29998, even, because the launchers' preflight uses
# the next port too. Outside the ephemeral range (32768+) that outgoing connections draw from.
MASTER_PORT=${LAUNCHER_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 5000 * 2))}
RUN_DIR=${LAUNCHER_RUN_DIR:-outputs/slurm/$SLURM_JOB_ID}
NNODES=${SLURM_NNODES:-1}

args=(
  "hydra.run.dir=$RUN_DIR"
  "launcher.nnodes=$NNODES"
  # Each launcher's rank is its Slurm node id, read by Hydra inside each task (0 on the first node).
  'launcher.node_rank=${oc.env:SLURM_NODEID}'
  "launcher.master_addr=$MASTER_ADDR"
  "launcher.master_port=$MASTER_PORT"
  # Merging is a job of its own (slurm/merge.sh): it needs one CPU node, not the whole allocation.
  "merge.after_train=false"
)
# Workers per node = GPUs per node of the allocation (--gpus-per-node / --gres=gpu:N). Without GPUs the launcher
# picks its CPU default; launcher.nproc_per_node=N on the command line decides in either case.
if [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
  args+=("launcher.nproc_per_node=$SLURM_GPUS_ON_NODE")
fi

log "job $SLURM_JOB_ID (attempt $((${SLURM_RESTART_COUNT:-0} + 1))) on $NNODES node(s) [$SLURM_JOB_NODELIST]," \
  "rendezvous $MASTER_ADDR:$MASTER_PORT, run directory $RUN_DIR"

# --- stop requests ------------------------------------------------------------------------------------------
# USR1 (--signal=B:..., scancel --signal=USR1 --batch) reaches only this script: pass it to srun, which passes it
# to every process of its tasks on every node. The launchers ask their workers to finish the step and save, and
# wait for them even if the deepspeed/accelerate launchers in between die of the signal (launcher/__main__.py).
# SIGTERM (scancel, preemption, time limit) reaches every process of the job at once, srun and the launchers
# included, so it is only noted here; Slurm sends SIGKILL KillWait seconds later (30 by default).
stop=""
srun_pid=""
on_usr1() {
  stop=USR1
  log "received SIGUSR1: asking the launchers to checkpoint and stop"
  [[ -n $srun_pid ]] && kill -s USR1 "$srun_pid" 2>/dev/null
}
trap on_usr1 USR1
trap 'stop=TERM; log "received SIGTERM: the launchers checkpoint and stop; the job then ends"' TERM

# --- run: one launcher per node -----------------------------------------------------------------------------
# --ntasks/--ntasks-per-node again, because a job submitted with --ntasks-per-node=N>1 would otherwise start N
# launchers per node. --label prefixes every line with the node's task number (0: is node 0).
# --kill-on-bad-exit=0: a node that stops early on a stop request (exit 75) must not kill the others mid-save.
srun --ntasks="$NNODES" --ntasks-per-node=1 --label --kill-on-bad-exit=0 \
  "$PYTHON" -m launcher "${args[@]}" "$@" &
srun_pid=$!
[[ $stop == USR1 ]] && kill -s USR1 "$srun_pid" 2>/dev/null # USR1 that came before srun started
# A trapped signal interrupts `wait`; keep waiting until srun itself has ended, then collect its exit code.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
rc=$?

# --- requeue or finish --------------------------------------------------------------------------------------
STOPPED=75 # the launcher's exit code after its workers saved a checkpoint on request (launcher/checkpoint.py)
state=$(scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' || true)
if [[ $rc != 0 && ($stop == TERM || (-n $state && $state != JobState=RUNNING)) ]]; then
  # SIGTERM means scancel (or a preemption that requeues the job itself): the job must end, never come back.
  # (scontrol requeue would accept a job that is being cancelled.)
  log "stopped by SIG${stop:-TERM} (${state:-JobState unknown}): not requeueing; exit code $rc"
  exit "$rc"
fi
if ((rc == STOPPED)) || [[ $stop == USR1 && $rc != 0 ]]; then
  log "launchers stopped (exit code $rc): requeueing job $SLURM_JOB_ID; it will resume from $RUN_DIR/checkpoints"
  # Requeueing ends this attempt at once (SIGTERM to this script), so it comes last, after the checkpoint.
  trap - TERM USR1
  scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed"
  exit "$rc"
fi
if ((rc != 0)); then
  log "training failed with exit code $rc (see the lines above; N: says which node)"
else
  log "done: $RUN_DIR"
fi
exit "$rc"
