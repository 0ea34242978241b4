#!/usr/bin/env bash
# moerun under Slurm: cluster/slurm/moerun.sbatch trains the tiny config on 2 tasks through
# srun --mpi=pmix, a rank that fails under srun ends the step with a message naming it, and
# SIGUSR1 from Slurm stops a training job with a committed checkpoint.
# Starts a private single-node cluster (cluster/slurm/local-cluster.sh) and stops it after;
# where a Slurm cluster already answers, it runs there only with MOERUN_TEST_SLURM=existing.
# Exit 77 (skipped) when Slurm is not installed or no cluster can be started here.
# usage: slurm_test.sh <moerun> <fault_probe> <source dir>
set -u
moerun=$1
probe=$2
src=$3
skip() {
  echo "SKIPPED: $*"
  exit 77
}
command -v srun > /dev/null && command -v sbatch > /dev/null ||
  skip "Slurm is not installed (apt-get install -y slurm-wlm munge)"
work=$(mktemp -d)
started=""
cleanup() {
  [ -n "$started" ] && MOERUN_SLURM_DIR=$started bash "$src/cluster/slurm/local-cluster.sh" stop > /dev/null
  rm -rf "$work"
}
trap cleanup EXIT
if timeout 10 sinfo -h > /dev/null 2>&1; then
  [ "${MOERUN_TEST_SLURM:-}" = existing ] ||
    skip "a Slurm cluster already answers here; MOERUN_TEST_SLURM=existing runs the test on it"
else
  out=$(MOERUN_SLURM_DIR=$work/slurm bash "$src/cluster/slurm/local-cluster.sh" start 2>&1) ||
    skip "could not start a local Slurm cluster: $(tail -n 3 <<< "$out")"
  started=$work/slurm
  export SLURM_CONF=$work/slurm/slurm.conf
fi
fails=0
fail() {
  echo "FAIL $*"
  fails=$((fails + 1))
}

# 1. The batch script trains on 2 tasks; the final JSON line says 2 ranks.
cd "$src" || exit 1
if MOERUN_BIN=$moerun timeout 120 sbatch --wait --ntasks=2 --output="$work/job.out" \
  cluster/slurm/moerun.sbatch train --config configs/tiny_test.pbtxt \
  -o train.out_dir="$work/run" > /dev/null 2>&1 &&
  grep -q '"event":"final".*"ranks":2' "$work/job.out" && [ -s "$work/run/checkpoints/LATEST" ]; then
  echo "ok   sbatch train on 2 tasks"
else
  fail "sbatch train:"
  tail -n 20 "$work/job.out" 2> /dev/null
fi

# 2. A rank exiting early ends the whole step, and the output names it.
out=$(timeout 60 srun --mpi=pmix --kill-on-bad-exit=1 -n 2 "$probe" exit 2>&1)
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q 'rank 1 (host [^)]*): process is exiting' <<< "$out"; then
  echo "ok   failing rank under srun: rc=$rc"
else
  fail "failing rank under srun: rc=$rc"
  head -n 20 <<< "$out"
fi
# 3. The signal Slurm sends before a time limit (moerun.sbatch asks for SIGUSR1; scancel
#    --signal delivers it the same way, to every task of the job's steps): every rank stops
#    at a step boundary and commits a checkpoint of that step.
job=$(MOERUN_BIN=$moerun sbatch --parsable --ntasks=2 --output="$work/sig.out" \
  cluster/slurm/moerun.sbatch train --config configs/tiny_test.pbtxt -o train.steps=1000000 \
  -o train.log_every=100 -o train.out_dir="$work/sig" 2> /dev/null)
for _ in $(seq 1 300); do
  grep -q "step 100/" "$work/sig.out" 2> /dev/null && break
  sleep 0.2
done
scancel --signal=USR1 "$job" 2> /dev/null
for _ in $(seq 1 300); do
  [ -z "$(squeue -h -j "$job" 2> /dev/null)" ] && break
  sleep 0.2
done
scancel "$job" 2> /dev/null
stop=$(grep -o 'SIGUSR1: stopping at step [0-9]*' "$work/sig.out" 2> /dev/null | grep -o '[0-9]*$')
if [ -n "$stop" ] && [ "$(cat "$work/sig/checkpoints/LATEST" 2> /dev/null)" = "$(printf 'step_%08d' "$stop")" ]; then
  echo "ok   SIGUSR1 from Slurm: stopped at step $stop and committed its checkpoint"
else
  fail "SIGUSR1 from Slurm (job $job):"
  tail -n 10 "$work/sig.out" 2> /dev/null
fi

echo "$((3 - fails)) passed, $fails failed"
[ $fails -eq 0 ]
