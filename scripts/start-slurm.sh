#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (Debian's slurm-wlm and munge), for the tests of
# reference calculations through AiiDA with the core.slurm scheduler. Idempotent: installs what is
# missing, writes /etc/slurm/slurm.conf for one node (this host, partition "debug"), starts munged,
# slurmctld and slurmd unless they run (restarts them when the configuration changed), and waits
# until the node is idle. Run as root. No cgroups needed (proctrack/linuxproc, task/none).
set -euo pipefail
conf=/etc/slurm/slurm.conf
logdir=/var/log/slurm
ctld_pid=/run/slurmctld.pid
slurmd_pid=/run/slurmd.pid

die() {
  echo "start-slurm.sh: $*" >&2
  exit 1
}

# The tails of the daemons' logs (of $@, or of slurmctld's and slurmd's), on stderr.
show_logs() {
  local f
  [ $# -gt 0 ] || set -- "$logdir/slurmctld.log" "$logdir/slurmd.log"
  for f in "$@"; do
    [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}

# Whether process $1 is alive (not a zombie: nothing here may reap a daemon's exited parent at once)
# and named $2.
alive() {
  local stat
  [ "$(cat "/proc/$1/comm" 2>/dev/null || true)" = "$2" ] || return 1
  stat="$(cat "/proc/$1/stat" 2>/dev/null || true)"
  stat="${stat##*) }"
  [ -n "$stat" ] && [ "${stat%% *}" != Z ] && [ "${stat%% *}" != X ]
}

# The PID of a running daemon: the one in its pid file, else any process of that name.
running_pid() {
  local pidfile="$1" name="$2" pid
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [ -n "$pid" ] && alive "$pid" "$name" && { echo "$pid"; return 0; }
  for pid in $(pgrep -x "$name" || true); do
    alive "$pid" "$name" && { echo "$pid"; return 0; }
  done
  return 1
}

stop_daemon() {
  local pid
  pid="$(running_pid "$1" "$2")" || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}

[ "$(id -u)" = 0 ] || die "must run as root"
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
  || ! command -v munged >/dev/null 2>&1 || ! command -v sinfo >/dev/null 2>&1; then
  apt_log="$(mktemp)"
  if ! { apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq slurm-wlm munge; } >"$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2
    die "could not install slurm-wlm munge with apt-get"
  fi
  rm -f "$apt_log"
fi

# munge: a key (the package usually made one), then the daemon, then a credential round trip.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
chmod 755 /run/munge
if ! running_pid /run/munge/munged.pid munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged || { show_logs /var/log/munge/munged.log; die "munged did not start"; }
fi
for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
munge -n | unmunge >/dev/null || { show_logs /var/log/munge/munged.log; die "munge credentials do not round-trip (munged not working)"; }

# slurm.conf: one node named as this host, reached on 127.0.0.1.
node="$(hostname -s)"
cpus="$(nproc)"
total_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
memory=$((total_mb > 4096 ? total_mb - 1024 : total_mb * 9 / 10))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$logdir"
cat > "$conf.new" <<CONF
# written by ionflow's scripts/start-slurm.sh: one node, for tests
ClusterName=ionflow-test
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${ctld_pid}
SlurmdPidFile=${slurmd_pid}
SlurmctldLogFile=${logdir}/slurmctld.log
SlurmdLogFile=${logdir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
CONF
if cmp -s "$conf.new" "$conf"; then
  rm "$conf.new"
else
  mv "$conf.new" "$conf"
  stop_daemon "$slurmd_pid" slurmd
  stop_daemon "$ctld_pid" slurmctld
fi

started=""
if ! running_pid "$ctld_pid" slurmctld >/dev/null; then
  slurmctld || { show_logs; die "slurmctld did not start"; }
  started=1
fi
slurmd_since=0
if ! running_pid "$slurmd_pid" slurmd >/dev/null; then
  slurmd_since="$(($(date +%s) - 1))"
  slurmd || { show_logs; die "slurmd did not start"; }
  started=1
fi

# Whether the slurmd we started has registered with slurmctld (a restarted slurmctld reports the
# node's saved state before that).
registered() {
  local since
  [ "$slurmd_since" = 0 ] && return 0
  since="$(scontrol -o show node "$node" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')"
  [ -n "$since" ] && [ "$(date -d "$since" +%s 2>/dev/null || echo 0)" -ge "$slurmd_since" ]
}

state=""
for i in $(seq 120); do
  state="$(sinfo -h -n "$node" -o %t 2>/dev/null || true)"
  case "$state" in
    idle | mix | alloc | comp)
      registered || { sleep 0.5; continue; }
      echo "$(sinfo -V): node ${node} ${state}, partition debug${started:+ (started)}"
      exit 0
      ;;
    drain* | drng* | down* | fail*)
      # left drained or down by an earlier run (e.g. a killed slurmd): back to service, every 5 s.
      if [ "$i" -gt 10 ] && [ "$((i % 10))" = 1 ]; then
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
      fi
      ;;
  esac
  running_pid "$ctld_pid" slurmctld >/dev/null || { show_logs; die "slurmctld exited"; }
  running_pid "$slurmd_pid" slurmd >/dev/null || { show_logs; die "slurmd exited"; }
  sleep 0.5
done
show_logs
die "node ${node} did not become idle within 60 s (sinfo state: ${state:-none})"
