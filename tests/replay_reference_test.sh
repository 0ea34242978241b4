#!/usr/bin/env bash
# moerun replay-moe against the independent NumPy reference (tests/reference/): outputs,
# losses and routing of the spec's semantics, and gradients by float64 finite differences,
# for several cases under mpirun -np 1, 2, 4 (and 8: two replicas of each of 4 experts).
# usage: replay_reference_test.sh <moerun> <python3> <mpiexec>
set -u
moerun=$1
python=$2
mpiexec=$3
ref=$(cd "$(dirname "$0")/reference" && pwd)
"$python" -c "import numpy, safetensors" 2>/dev/null || {
  echo "skipped: python3 lacks numpy or safetensors (bash cluster/setup.sh installs them)"
  exit 77
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
check() {  # name, ranks, make_case args...
  local name=$1 ranks=$2
  shift 2
  local case=$tmp/$name.safetensors
  [ -f "$case" ] || "$python" "$ref/make_case.py" --quiet --out "$case" "$@" >/dev/null ||
    { echo "FAIL $name: make_case.py failed"; failed=$((failed + 1)); return; }
  for np in $ranks; do
    local out=$tmp/$name.np$np.safetensors log
    if ! log=$("$mpiexec" --oversubscribe -np "$np" "$moerun" replay-moe --case "$case" --out "$out" 2>&1); then
      echo "FAIL $name np=$np: replay-moe failed:"; echo "$log" | tail -5
      failed=$((failed + 1)); continue
    fi
    if log=$("$python" "$ref/check_result.py" --case "$case" --result "$out" 2>&1); then
      passed=$((passed + 1)); echo "ok   $name np=$np"
    else
      echo "FAIL $name np=$np:"; echo "$log"
      failed=$((failed + 1))
    fi
  done
}
common=(--d 8 --m 16 --importance-weight 0.01 --load-weight 0.01 --gshard-weight 0.01)
check bpr_noise_drops "1 2 4" --seed 3 --tokens 16 --experts 4 --k 2 --capacity-factor 0.75 \
  --multiple-of 0 --bpr 1 --group-size 4 --noise-std 1.0 --with-noise "${common[@]}"
check vanilla_drops_e8 "1 2 4 8" --seed 5 --tokens 32 --experts 8 --k 2 --capacity-factor 0.5 \
  --multiple-of 0 --bpr 0 --group-size 4 "${common[@]}"
check k1_capacity1 "1 2" --seed 7 --tokens 16 --experts 4 --k 1 --capacity 1 --bpr 1 \
  --group-size 4 "${common[@]}"
check k_equals_e "1 4" --seed 9 --tokens 16 --experts 4 --k 4 --capacity-factor 1.0 --bpr 1 \
  --group-size 2 "${common[@]}"
check all_to_one "1 2" --seed 11 --tokens 16 --experts 4 --k 2 --capacity-factor 1.0 \
  --multiple-of 0 --bpr 1 --group-size 4 --all-to-one "${common[@]}"
check dropless "1 2" --seed 13 --tokens 16 --experts 4 --k 2 --capacity-factor 0 --bpr 0 \
  --group-size 4 "${common[@]}"
check replicas_noise "1 8" --seed 15 --tokens 32 --experts 4 --k 2 --capacity-factor 1.0 \
  --bpr 1 --group-size 4 --noise-std 1.0 --with-noise "${common[@]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
