#!/usr/bin/env bash
# moerun replay-modsquad against the independent NumPy reference
# (tests/reference/modsquad_reference.py, written from docs/modsquad_case_format.md): per-pass
# gates, routing, outputs (and the attention's queries and head outputs), the step's task x
# expert table, selection counts, usage EMA, MI and auxiliary losses, and every gradient
# (float64 finite differences), for MoE MLP and MoE attention cases under mpirun -np 1, 2, 4;
# then malformed cases, which must be clear errors.
# usage: replay_modsquad_test.sh <moerun> <python3> <mpiexec>
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
check() {  # name, ranks, make_modsquad_case args...
  local name=$1 ranks=$2
  shift 2
  local case=$tmp/$name.safetensors
  "$python" "$ref/make_modsquad_case.py" --quiet --out "$case" "$@" >/dev/null ||
    { echo "FAIL $name: make_modsquad_case.py failed"; failed=$((failed + 1)); return; }
  for np in $ranks; do
    local out=$tmp/$name.np$np.safetensors log
    if ! log=$("$mpiexec" --oversubscribe -np "$np" "$moerun" replay-modsquad --case "$case" --out "$out" 2>&1); then
      echo "FAIL $name np=$np: replay-modsquad failed:"; echo "$log" | tail -5
      failed=$((failed + 1)); continue
    fi
    if log=$("$python" "$ref/check_modsquad_result.py" --case "$case" --result "$out" --ranks "$np" 2>&1); then
      passed=$((passed + 1)); echo "ok   $name np=$np"
    else
      echo "FAIL $name np=$np:"; echo "$log" | grep -v "^ok " | tail -15
      failed=$((failed + 1))
    fi
  done
}
# Dropless: identical results at any rank count.
check mlp_dropless "1 2 4" --seed 1 --layer mlp --batch 4
check attention_dropless "1 2 4" --seed 2 --layer attention --batch 4
# Repeated and absent tasks, explicit noise, an initial usage EMA.
check mlp_noise_usage "1 2" --seed 3 --layer mlp --tasks 4 --passes 3 --pass-tasks 0,2,2 \
  --with-noise --with-usage
check attention_noise_usage "1 2" --seed 4 --layer attention --tasks 4 --passes 3 \
  --pass-tasks 3,0,3 --with-noise --with-usage
# Capacity with BPR (groups of 3 tokens: the same groups at 1 and 2 ranks), and vanilla order.
check mlp_capacity_bpr "1 2" --seed 5 --layer mlp --batch 4 --capacity-factor 0.5 \
  --multiple-of 0 --group-size 3
check attention_capacity_vanilla "1 2" --seed 6 --layer attention --batch 4 --capacity 1 \
  --bpr 0 --group-size 3
# More experts than ranks' replicas: P = 4 > E = 2 holds each expert twice.
check mlp_replicas "1 4" --seed 7 --layer mlp --experts 2 --k 1 --batch 4
# Per-rank MI statistics (the reference's per-GPU estimate): equal to the global one on 1 rank.
check mlp_mi_per_rank "1 2" --seed 8 --layer mlp --mi-per-rank 1 --batch 4
# Two tasks: MI reported, not added (as the reference).
check attention_two_tasks "1 2" --seed 9 --layer attention --tasks 2 --passes 2

# Malformed cases.
row() {  # row <regex> <case file>
  local pattern=$1 case=$2 out rc
  out=$("$moerun" replay-modsquad --case "$case" --out "$tmp/bad.out" 2>&1)
  rc=$?
  if [ "$rc" -ne 2 ] || ! grep -Eq -- "$pattern" <<<"$out"; then
    echo "FAIL malformed $case -> rc=$rc, wanted /$pattern/ in:"; echo "$out" | head -5
    failed=$((failed + 1))
  else
    passed=$((passed + 1)); echo "ok   malformed: $pattern"
  fi
}
base=$tmp/base.safetensors
"$python" "$ref/make_modsquad_case.py" --quiet --out "$base" --seed 11 --layer mlp >/dev/null
"$python" - "$base" "$tmp" <<'PY'
import sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
base, tmp = sys.argv[1:]
with safe_open(base, "np") as f:
    meta = f.metadata()
    t = {k: f.get_tensor(k) for k in f.keys()}
def write(name, tensors, metadata):
    save_file(tensors, f"{tmp}/{name}.safetensors", metadata=metadata)
write("missing", {k: v for k, v in t.items() if k != "experts.fc2.bias"}, meta)
write("shape", {**t, "experts.fc1.bias": t["experts.fc1.bias"][:, :3].copy()}, meta)
write("key", t, {**meta, "capacity_factr": "1.0"})
write("task", {**t, "pass1.task": np.array([7], np.int32)}, meta)
write("extra", {**t, "pass9.x": t["pass0.x"]}, meta)
write("layer", t, {**meta, "layer": "conv"})
PY
row "no tensor 'experts.fc2.bias'|experts.fc2.bias" "$tmp/missing.safetensors"
row "experts.fc1.bias.*shape|shape.*experts.fc1.bias" "$tmp/shape.safetensors"
row "unknown metadata key 'capacity_factr'; the settings are" "$tmp/key.safetensors"
row "pass1.task is 7, outside 0..2 \(the case has 3 tasks\)" "$tmp/task.safetensors"
row "unknown tensor 'pass9.x'" "$tmp/extra.safetensors"
row "metadata 'layer' = 'conv'; use mlp or attention" "$tmp/layer.safetensors"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
