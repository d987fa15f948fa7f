#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine: munged + slurmctld + two slurmd (nodes n1 and
# n2, both this host, on ports 17001-17002), everything under one scratch directory, no
# systemd, no cgroups. For trying the SLURM path on a workstation
# and for the tests (marker `slurm`). Needs root and Debian's slurmctld slurmd slurm-client
# munge (scripts/setup.sh installs them).
#
#   slurm/local-cluster.sh up     [DIR]   start (idempotent: a running cluster is left alone)
#   slurm/local-cluster.sh down   [DIR]   stop, by the pids in DIR (never by process name)
#   slurm/local-cluster.sh status [DIR]
#   slurm/local-cluster.sh env    [DIR]   prints `export SLURM_CONF=...` for client commands
#
# DIR defaults to $PRETRAIN_SLURM_DIR or /tmp/pretrain-slurm. Everything in it runs as root
# (the munge key, slurm.conf, pid files that `down` kills), so it must be private: `up` creates
# it with mode 0700 and a marker file, and refuses a DIR it did not create (another owner, a
# mode other than 700, no marker): a file another local user planted there is never used.
# Facts behind the config keys:
# ../shared/notes/slurm.md. Each node advertises CPUS (default 8) CPUs whatever the machine has
# (SlurmdParameters=config_overrides), so that several multi-task jobs fit on a 2-core box.
# The node names do not resolve (no /etc/hosts entries are made): NodeAddr says where a node
# is, and the sbatch templates take the rendezvous address from it, as on clusters whose
# node names are not host names.
set -euo pipefail

cmd="${1:-}"
DIR="$(realpath -m "${2:-${PRETRAIN_SLURM_DIR:-/tmp/pretrain-slurm}}")"
CPUS="${PRETRAIN_SLURM_CPUS:-8}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

die() { echo "local-cluster: $*" >&2; exit 1; }

MARKER=".pretrain-local-cluster"

# DIR is ours: a directory (not a link) owned by us, mode 700, with the marker we wrote when
# we created it. Returns non-zero with the reason on stderr otherwise.
trusted_dir() {
  [ -d "$DIR" ] && [ ! -L "$DIR" ] || { echo "$DIR is not a directory" >&2; return 1; }
  local owner mode
  owner=$(stat -c %u "$DIR"); mode=$(stat -c %a "$DIR")
  [ "$owner" = "$(id -u)" ] || { echo "$DIR belongs to uid $owner, not to uid $(id -u)" >&2; return 1; }
  [ "$mode" = 700 ] || { echo "$DIR has mode $mode, not 700 (others could have written to it)" >&2; return 1; }
  [ -f "$DIR/$MARKER" ] || { echo "$DIR was not created by local-cluster.sh (no $MARKER)" >&2; return 1; }
}

make_private_dir() {
  if [ -e "$DIR" ] || [ -L "$DIR" ]; then
    trusted_dir || die "refusing $DIR: the cluster runs as root with the files in it, so it only uses a directory it created itself; remove it or choose another DIR"
    return
  fi
  mkdir -p "$(dirname "$DIR")"
  (umask 077 && mkdir "$DIR")  # fails if someone created it in the meantime
  echo "created by slurm/local-cluster.sh for uid $(id -u) on $(date -u +%FT%TZ)" > "$DIR/$MARKER"
}

alive() {  # pid file -> running?
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,log,munge}
  cat > "$CONF" <<EOF
ClusterName=pretrain-local
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=1,sched_interval=5
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=300
SlurmdParameters=config_overrides
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$CPUS RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  alive "$DIR/munged.pid" && return
  [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
  chmod 600 "$DIR/munge/munge.key"
  munged --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
    --log-file="$DIR/log/munged.log" --pid-file="$DIR/munged.pid" --seed-file="$DIR/munge/seed" --force
}

wait_for() {  # seconds, description, command...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "timed out after ${limit}s waiting for $what (logs: $DIR/log)"
    sleep 0.2
  done
}

nodes_idle() { [ "$(sinfo -h -N -o %t | grep -cE '^(idle|mix|alloc)')" -eq 2 ]; }
slurmds_alive() { alive "$DIR/slurmd-n1.pid" && alive "$DIR/slurmd-n2.pid"; }

up() {
  [ "$(id -u)" -eq 0 ] || die "needs root (slurmd runs jobs as their users)"
  for bin in munged mungekey slurmctld slurmd sbatch scontrol; do
    command -v "$bin" >/dev/null || die "$bin is missing: apt-get install slurmctld slurmd slurm-client munge (scripts/setup.sh does)"
  done
  make_private_dir
  if alive "$DIR/slurmctld.pid" && slurmds_alive && scontrol ping >/dev/null 2>&1; then
    echo "local-cluster: already up in $DIR"
    return
  fi
  # A cold start wipes old job state: a stale node state would leave the node drained.
  down_quiet
  rm -rf "$DIR/state" "$DIR/spool"
  write_conf
  start_munge
  slurmctld -f "$CONF" -i
  wait_for 30 "slurmctld" scontrol ping
  slurmd -f "$CONF" -N n1
  slurmd -f "$CONF" -N n2
  wait_for 30 "both nodes to be idle" nodes_idle
  echo "local-cluster: up in $DIR (nodes n1 and n2, $CPUS CPUs each); export SLURM_CONF=$CONF"
}

stop_pid() {  # pid file
  alive "$1" || { rm -f "$1"; return 0; }
  local pid
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$1"
}

stop_stepds() {
  # slurmstepd outlives slurmd and has a cleared environment: find it by the sockets it holds
  # in our spool directory, so only this cluster's processes are touched.
  [ -d "$DIR/spool" ] || return 0
  local pids
  pids=$(for p in /proc/[0-9]*; do
           ls -l "$p/fd" 2>/dev/null | grep -q "$DIR/spool" && basename "$p"
         done | sort -u) || true
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

down_quiet() {
  stop_pid "$DIR/slurmd-n1.pid"
  stop_pid "$DIR/slurmd-n2.pid"
  stop_pid "$DIR/slurmd.pid"  # a one-node cluster of an older version of this script
  stop_stepds
  stop_pid "$DIR/slurmctld.pid"
  stop_pid "$DIR/munged.pid"
}

case "$cmd" in
  up) up ;;
  down)
    # Its pid files say what to kill: only those of a directory of ours.
    trusted_dir || die "refusing to act on $DIR"
    down_quiet; echo "local-cluster: down ($DIR)" ;;
  status)
    if trusted_dir 2>/dev/null && alive "$DIR/slurmctld.pid" && slurmds_alive && scontrol ping >/dev/null 2>&1; then
      sinfo; exit 0
    fi
    echo "local-cluster: not running ($DIR)"; exit 1 ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: $0 up|down|status|env [DIR]" ;;
esac
