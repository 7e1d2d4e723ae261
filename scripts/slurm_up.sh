#!/usr/bin/env bash
# Start a real, tiny Slurm cluster on this one machine, for tests: NUM_NODES fake nodes n1..nN (default 2),
# each its own slurmd on 127.0.0.1, all sharing this host's cores.
#   usage: scripts/slurm_up.sh [NUM_NODES]        (as root; stop it with scripts/slurm_down.sh)
# Idempotent: if the cluster is already up it only checks that all nodes are idle.
# Config goes to /etc/slurm/slurm.conf, where Debian's Slurm looks by default, so sbatch/srun/sinfo need
# no SLURM_CONF. Logs, state, pid files and the list of PIDs we started ($STATE/pids) live in
# SLURM_STATE_DIR (default /tmp/launcher-slurm). No systemd here, so every daemon is started by hand.
set -euo pipefail

N=${1:-2}
STATE=${SLURM_STATE_DIR:-/tmp/launcher-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by launcher scripts/slurm_up.sh"
HOST=$(hostname)
t0=$SECONDS

die() { echo "[slurm_up] error: $*" >&2; exit 1; }
log() { echo "[slurm_up] $*" >&2; }
[[ $N =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES must be a positive integer, got '$N'"
[[ $(id -u) == 0 ]] || die "run as root (installs packages, writes /etc/slurm, /etc/hosts)"

# A PID counts as ours only if it is alive and still runs the program we recorded (guards PID reuse).
alive() { [[ -n ${2:-} && -r /proc/$2/comm && $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]]; }
pid_of() { cat "$1" 2>/dev/null || true; }
record() { echo "$1 $2" >>"$STATE/pids"; }

# --- packages: apt-get update only if the local index cannot serve the install ---
pkgs=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes
  apt_install() { apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
  apt_install || { apt-get update -qq >/dev/null && apt_install; }
  log "installed in $((SECONDS - t0)) s"
fi

mkdir -p "$STATE"/{ctld,log,run}
for i in $(seq "$N"); do mkdir -p "$STATE/spool/n$i"; done # slurmd logs an error if its spool dir is missing
# Forget recorded daemons that have since died, so $STATE/pids lists only what runs now.
touch "$STATE/pids"
while read -r name pid; do
  if alive "$name" "$pid"; then echo "$name $pid"; fi
done <"$STATE/pids" >"$STATE/pids.new"
mv "$STATE/pids.new" "$STATE/pids"

# --- munge: slurm authenticates every RPC with it; all daemons must share one key ---
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged # daemonizes; writes /run/munge/munged.pid
  for _ in $(seq 50); do alive munged "$(pid_of /run/munge/munged.pid)" && break; sleep 0.1; done
  alive munged "$(pid_of /run/munge/munged.pid)" || die "munged did not start (see /var/log/munge/munged.log)"
  record munged "$(cat /run/munge/munged.pid)"
fi

# --- /etc/hosts: some Slurm paths resolve the node *name*, so n1..nN must resolve too ---
for i in $(seq "$N"); do
  grep -qE "^127\.0\.0\.1[[:space:]]+n$i([[:space:]]|$)" /etc/hosts || echo "127.0.0.1 n$i" >>/etc/hosts
done

# --- slurm.conf ---
# Each fake node claims CPUs=2, the real core count: slurmd checks the claim against the hardware and
# drains a node that claims more, but nothing checks the sum, so N nodes x 2 CPUs share the 2 real cores.
nodes="n[1-$N]"
((N == 1)) && nodes=n1
conf=$(
  cat <<EOF
$MARK for $N nodes; state in $STATE
ClusterName=launcher
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# cred_expire (step credential lifetime) also holds a requeued job for cred_expire+1 s before it may
# start again. Default 120; 5 is the smallest accepted (smaller is rejected and silently means 120).
AuthInfo=cred_expire=5
MailProg=/bin/true
# No cgroups here: track processes by parent PID, bind nothing. Hence no cgroup.conf is needed.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Schedule every second instead of every 60 s / 30 s: with cred_expire=5 a requeued job restarts
# ~6.5 s after 'scontrol requeue' (measured), instead of ~11-16 s with both intervals at 5.
SchedulerParameters=sched_interval=1,bf_interval=1
# Batch jobs may be requeued (scontrol requeue); no preemption plugin, so PreemptMode is left unset.
JobRequeue=1
# No slurmdbd, hence no sacct: finished jobs stay in 'scontrol show job' for MinJobAge s, and every
# finished job is appended to the jobcomp file.
MinJobAge=300
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
# A node that was down comes back by itself when its slurmd registers.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL on scancel / time limit.
KillWait=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldPort=6817
EOF
  for i in $(seq "$N"); do
    echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=2 RealMemory=1000 State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=UNLIMITED State=UP"
)
ctld_pid=$(pid_of "$STATE/run/slurmctld.pid")
if ! alive slurmctld "$ctld_pid" && scontrol ping 2>/dev/null | grep -q UP; then
  die "a slurmctld not started from $STATE is running (another SLURM_STATE_DIR?); stop it first"
fi
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script; move it away first"
fi
if [[ ! -f $CONF || $(cat "$CONF") != "$conf" ]]; then
  alive slurmctld "$ctld_pid" && die "cluster is up with another config (node count?); run scripts/slurm_down.sh first"
  mkdir -p "$CONF_DIR"
  echo "$conf" >"$CONF"
fi

# --- daemons ---
if ! alive slurmctld "$ctld_pid"; then
  slurmctld # daemonizes, writes SlurmctldPidFile
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  ctld_pid=$(pid_of "$STATE/run/slurmctld.pid")
  alive slurmctld "$ctld_pid" || { tail -n 20 "$STATE/log/slurmctld.log" >&2; die "slurmctld did not start"; }
  record slurmctld "$ctld_pid"
fi
for i in $(seq "$N"); do
  pidf=$STATE/run/slurmd-n$i.pid
  alive slurmd "$(pid_of "$pidf")" && continue
  slurmd -N "n$i" # one slurmd per fake node; -N picks its NodeName (and so its port)
  for _ in $(seq 50); do alive slurmd "$(pid_of "$pidf")" && break; sleep 0.1; done
  alive slurmd "$(pid_of "$pidf")" || { tail -n 20 "$STATE/log/slurmd-n$i.log" >&2; die "slurmd n$i did not start"; }
  record slurmd "$(cat "$pidf")"
done

# --- wait (bounded) until every node is idle (or running jobs, on a re-run) ---
for _ in $(seq 120); do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
  busy=$(awk '$2 !~ /^(idle|mix|alloc)$/' <<<"$states")
  [[ -n $states && -z $busy ]] && break
  sleep 0.5
done
[[ -n $states && -z $busy ]] || { echo "$states" >&2; die "nodes not idle after 60 s (logs: $STATE/log)"; }
echo "slurm up: $N node(s) $nodes [$(awk '{print $2}' <<<"$states" | sort | uniq -c | xargs)], conf $CONF, state $STATE, $((SECONDS - t0)) s"
