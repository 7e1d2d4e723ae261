#!/usr/bin/env bash
# Stop the local test cluster started by scripts/slurm_up.sh: exactly the daemons listed in $STATE/pids
# (SLURM_STATE_DIR, default /tmp/launcher-slurm). Packages, config, logs and state stay. Idempotent.
# Jobs still queued or running on *this* cluster are cancelled first: slurmstepd and the job's processes
# outlive a stopped slurmd, so they would otherwise leak.
set -euo pipefail

STATE=${SLURM_STATE_DIR:-/tmp/launcher-slurm}
PIDS=$STATE/pids
log() { echo "[slurm_down] $*" >&2; }
# A PID counts as ours only if it is alive and still runs the program we recorded (guards PID reuse).
alive() { [[ -r /proc/$2/comm && $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]]; }

[[ -s $PIDS ]] || { log "nothing recorded in $PIDS; nothing to stop"; exit 0; }

ctld=$(awk '$1 == "slurmctld" {print $2}' "$PIDS" | tail -n 1)
if [[ -n $ctld ]] && alive slurmctld "$ctld"; then
  mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
  if ((${#jobs[@]})); then
    log "cancelling jobs on this cluster: ${jobs[*]}"
    scancel "${jobs[@]}" || true
    # Bounded: KillWait (10 s) between SIGTERM and SIGKILL, plus margin.
    for _ in $(seq 30); do [[ -z $(squeue -h -t R,CG -o %i 2>/dev/null) ]] && break; sleep 0.5; done
  fi
fi

# Slurm daemons first, munged last (they talk through it to the end). Each takes ~2 s to exit on SIGTERM.
stop=()
running() { # how many of the daemons we signalled are still alive
  local s k=0
  for s in "${stop[@]}"; do if alive "${s%%:*}" "${s#*:}"; then k=$((k + 1)); fi; done
  echo "$k"
}
for group in "slurmd slurmctld" munged; do
  while read -r n pid; do
    if [[ " $group " == *" $n "* ]] && alive "$n" "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      stop+=("$n:$pid")
    fi
  done <"$PIDS"
  for _ in $(seq 100); do # up to 10 s per group
    (($(running) == 0)) && break
    sleep 0.1
  done
done
for s in "${stop[@]}"; do
  if alive "${s%%:*}" "${s#*:}"; then
    log "SIGKILL ${s%%:*} ${s#*:}"
    kill -KILL "${s#*:}" 2>/dev/null || true
  fi
done
: >"$PIDS"
log "stopped ${#stop[@]} daemon(s)${stop[*]:+: ${stop[*]}}"
