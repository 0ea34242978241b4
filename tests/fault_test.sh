#!/usr/bin/env bash
# A failure on one rank ends the whole job, promptly, with a message naming the rank.
# usage: fault_test.sh <fault_probe binary> <mpiexec>
set -u
probe=$1
mpiexec=$2
fails=0
run_case() {  # mode, max seconds, regex the output must match[, ranks]
  local mode=$1 limit=$2 pattern=$3 np=${4:-2} start out rc elapsed
  start=$(date +%s)
  out=$(timeout 60 "$mpiexec" --oversubscribe -np "$np" "$probe" "$mode" 2>&1)
  rc=$?
  elapsed=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ] || [ $rc -eq 124 ] || [ $elapsed -gt "$limit" ] || ! grep -Eq "$pattern" <<<"$out"; then
    echo "FAIL $mode: rc=$rc after ${elapsed}s (limit ${limit}s), wanted /$pattern/ in:"
    echo "$out" | head -30
    fails=$((fails + 1))
  else
    echo "ok   $mode: rc=$rc after ${elapsed}s"
  fi
}
run_case watchdog 30 'rank 0 \(host [^)]*\): collective barrier on communicator .world. \(2 ranks\) made no progress'
run_case mpi-error 30 'rank [01] \(host [^)]*\): MPI call MPI_Bcast\(.*\) failed at .*fault_probe.cc:[0-9]+'
run_case check 30 '\[r1 [^]]*\] F.*Check failed: false injected failure'
run_case exit 30 'rank 1 \(host [^)]*\): process is exiting without MPI_Finalize'
# One rank of four stalls: the message names it (3 s watchdog, up to 1.5 s of asking).
run_case loop 40 'made no progress .* rank 2: not in a collective for [0-9.]+ s \(last: all_reduce #1\).*did not arrive: rank 2\.' 4
run_case stop 40 'made no progress .* rank 2: did not answer within [0-9.]+ s \(stopped, dead, or hung outside MPI\).*did not arrive: rank 2\.' 4
run_case kill 40 'rank 2 .*(exited on signal 9|Killed)|did not arrive: rank 2\.' 4
echo "$((7 - fails)) passed, $fails failed"
[ $fails -eq 0 ]
