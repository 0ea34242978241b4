#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying cluster/slurm/moerun.sbatch
# without a real cluster. Needs root and the Debian packages slurm-wlm and munge.
#   bash cluster/slurm/local-cluster.sh start   # prints: export SLURM_CONF=...
#   bash cluster/slurm/local-cluster.sh stop
# State, logs and the private slurm.conf live in ${MOERUN_SLURM_DIR:-/tmp/moerun-slurm}.
set -euo pipefail
dir=${MOERUN_SLURM_DIR:-/tmp/moerun-slurm}
conf=$dir/slurm.conf
cmd=${1:-start}

die() {
  echo "local-cluster.sh: $*" >&2
  exit 1
}

# SIGTERM, then up to 20 s for the daemon to finish its steps, then SIGKILL.
stop() {
  for d in slurmd slurmctld; do
    [[ -f $dir/$d.pid ]] || continue
    pid=$(cat "$dir/$d.pid")
    if kill "$pid" 2> /dev/null; then
      for _ in $(seq 1 40); do
        # Gone, or a zombie (where PID 1 does not reap orphans): done either way.
        [[ -r /proc/$pid/stat && $(awk '{print $3}' "/proc/$pid/stat") != Z ]] || break
        sleep 0.5
      done
      kill -9 "$pid" 2> /dev/null || true
    fi
    rm -f "$dir/$d.pid"
  done
}

case $cmd in
  stop)
    stop
    echo "stopped the local Slurm cluster in $dir"
    exit 0
    ;;
  start) ;;
  *) die "unknown command '$cmd' (use start or stop)" ;;
esac

[[ $(id -u) == 0 ]] || die "run as root (slurmd must start jobs as any user)"
for b in slurmctld slurmd munged srun sinfo; do
  command -v "$b" > /dev/null || die "$b not found: apt-get install -y slurm-wlm munge"
done
ls /usr/lib/x86_64-linux-gnu/slurm-wlm/mpi_pmix*.so > /dev/null 2>&1 ||
  die "Slurm's PMIx plugin is missing: apt-get install -y slurm-wlm (Debian 12 ships mpi_pmix)"

mkdir -p "$dir/state" "$dir/spool"
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
cat > "$conf" << CONF
ClusterName=moerun-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

# munge: a key, then the daemon (once).
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create 2> /dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key 2> /dev/null || true
  chmod 400 /etc/munge/munge.key
fi
if ! pgrep -x munged > /dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge 2> /dev/null || true
  su -s /bin/sh munge -c munged 2> /dev/null || munged --force
fi

stop
export SLURM_CONF=$conf
slurmctld -f "$conf"
slurmd -f "$conf"
for _ in $(seq 1 30); do
  if sinfo -h -o %t 2> /dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "local Slurm cluster up: $host, $cpus CPUs (logs in $dir)"
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
die "the node did not come up within 30 s; see $dir/slurmctld.log and $dir/slurmd.log"
