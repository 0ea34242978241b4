#!/usr/bin/env bash
# Scaling tools: `moerun sweep` (grid, CSVs, plots, resume, refusals), `moerun dry-run`
# (one rank of a P-rank job with simulated peers: parameters equal to the plan's, memory
# beside it) and the plan's step-time projection (checked against its own inputs by
# independent arithmetic).
# usage: scaling_test.sh <moerun binary> <source dir> <mpiexec>
set -u
moerun=$1
src=$2
mpiexec=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
py=/usr/bin/python3
[ -x "$py" ] || py=python3
expect() {
  local want_rc=$1 pattern=$2 out rc
  shift 2
  out=$(timeout 300 "$@" 2>&1)
  rc=$?
  if [ "$rc" -ne "$want_rc" ] || ! grep -Eq -- "$pattern" <<<"$out"; then
    echo "FAIL: $* -> rc=$rc (want $want_rc), wanted /$pattern/ in:"
    echo "$out" | tail -20
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
}
check() {  # check <description> <command...>: the command must succeed
  local what=$1
  shift
  if "$@"; then passed=$((passed + 1)); else
    echo "FAIL: $what"
    failed=$((failed + 1))
  fi
}
cfg=$src/configs/tiny_test.pbtxt
sw=$tmp/sweep
grid=(--grid ranks=1,2 --grid model.moe.capacity_factor=0.5,1.25 --grid model.moe.bpr=false,true)

# --- sweep ------------------------------------------------------------------------------------
expect 0 'p008  ranks=2 model.moe.capacity_factor=1.25 model.moe.bpr=true' \
  "$moerun" sweep "$cfg" "${grid[@]}" --steps 12 --out "$sw" --dry-run
check "dry-run writes nothing" test ! -e "$sw"
# --device cuda reaches every point's train and eval; without a GPU here it is refused (exit
# 3) before anything is written, the dry run only printing.
expect 0 "train. .--device. .cuda. .--config.*eval. .--device. .cuda. .--config" \
  bash -c "'$moerun' sweep '$cfg' --grid ranks=1 --eval-capacities 1 --out '$sw' --dry-run --device cuda | tr '\n' ' '"
expect 2 '--device tpu: use cpu or cuda' "$moerun" sweep "$cfg" --grid ranks=1 --device tpu --out "$sw"
if "$moerun" env --json | grep -q '"cuda_devices":0'; then
  expect 3 '--device cuda: this host has no visible CUDA device' \
    "$moerun" sweep "$cfg" --grid ranks=1 --out "$sw" --device cuda --launcher mpirun
  check "a refused sweep writes nothing" test ! -e "$sw"
fi
expect 0 '"event":"sweep","failed":0,"kept":0,"points":8' \
  "$moerun" sweep "$cfg" "${grid[@]}" --steps 12 --eval-capacities 0.25,0.5,1 --out "$sw"
check "sweep.csv: header + 8 rows, all ok" \
  bash -c "[ \$(wc -l <'$sw/sweep.csv') -eq 9 ] && [ \$(grep -c ',ok,' '$sw/sweep.csv') -eq 8 ]"
check "eval_capacity.csv: header + 8 x 3 rows" bash -c "[ \$(wc -l <'$sw/eval_capacity.csv') -eq 25 ]"
# Every row's numbers are consistent: the step-time parts add up to the total, tokens/s is
# images/s times the 17 tokens of an image, dropping falls with the capacity factor.
check "CSV figures consistent" "$py" - "$sw" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1] + "/sweep.csv")))
assert len(rows) == 8
for r in rows:
    parts = sum(float(r[k]) for k in ("router_ms", "dispatch_a2a_ms", "experts_ms", "combine_ms",
                                      "dense_ms", "grad_reduce_ms", "optimizer_ms", "data_ms"))
    assert abs(parts - float(r["step_ms"])) < 1e-3 * float(r["step_ms"]) + 1e-6, r
    assert abs(float(r["tokens_per_s"]) - 17 * float(r["images_per_s"])) < 1e-3 * float(r["tokens_per_s"]), r
    assert int(r["steps"]) == 12 and float(r["peak_rss_mib"]) > 10
lo = [float(r["dropped_fraction"]) for r in rows if r["model.moe.capacity_factor"] == "0.5"]
hi = [float(r["dropped_fraction"]) for r in rows if r["model.moe.capacity_factor"] == "1.25"]
assert min(lo) > max(hi), (lo, hi)
# 2-image groups: the rank count does not change the results (same losses within noise).
by = {}
for r in rows:
    by.setdefault((r["model.moe.capacity_factor"], r["model.moe.bpr"]), []).append(float(r["train_loss"]))
for k, v in by.items():
    assert abs(v[0] - v[1]) <= 1e-5 * abs(v[0]), (k, v)
ev = list(csv.DictReader(open(sys.argv[1] + "/eval_capacity.csv")))
for r in ev:
    assert 0 <= float(r["test_accuracy"]) <= 1
EOF
if "$py" -c "import matplotlib" 2>/dev/null; then
  for png in throughput step_time drop_rate accuracy_vs_eval_capacity; do
    check "$png.png is a PNG" bash -c "head -c 8 '$sw/$png.png' | od -An -c | grep -q 'P   N   G'"
  done
else
  echo "skipped: the PNG checks (no Matplotlib for $py)"
fi
cp "$sw/sweep.csv" "$tmp/first.csv"
expect 0 '"kept":8,"points":8' \
  "$moerun" sweep "$cfg" "${grid[@]}" --steps 12 --eval-capacities 0.25,0.5,1 --out "$sw"
check "a resumed sweep keeps the rows" cmp -s "$sw/sweep.csv" "$tmp/first.csv"
# A point stopped after training (no result.json) is only evaluated again; one stopped
# during training (neither file) resumes from its checkpoint.
rm "$sw/points/p003/result.json"
expect 0 '\[3/8\] p003 .*trained in an earlier run; evaluating' \
  "$moerun" sweep "$cfg" "${grid[@]}" --steps 12 --eval-capacities 0.25,0.5,1 --out "$sw"
check "re-evaluating gives the same rows" cmp -s "$sw/sweep.csv" "$tmp/first.csv"
rm "$sw/points/p004/result.json" "$sw/points/p004/train_final.json"
expect 0 '\[4/8\] p004 .*: training' \
  "$moerun" sweep "$cfg" "${grid[@]}" --steps 12 --eval-capacities 0.25,0.5,1 --out "$sw"
expect 0 'resuming from .*step_00000012' cat "$sw/points/p004/train.log"
expect 2 "holds a sweep with other settings" \
  "$moerun" sweep "$cfg" "${grid[@]}" --steps 13 --out "$sw"
expect 2 "point ranks=1 model.moe.nonsense=1: .*nonsense" \
  "$moerun" sweep "$cfg" --grid ranks=1 --grid model.moe.nonsense=1 --out "$tmp/s2"
expect 2 "ranks value '0': must be a whole number" "$moerun" sweep "$cfg" --grid ranks=0,1
expect 2 "point ranks=3: " "$moerun" sweep "$cfg" --grid ranks=3 --out "$tmp/s3"
expect 2 "axis 'ranks' is given twice" "$moerun" sweep "$cfg" --grid ranks=1 --grid ranks=2
expect 2 "value '1' is repeated" "$moerun" sweep "$cfg" --grid ranks=1,1
expect 2 "a grid axis is key=v1,v2" "$moerun" sweep "$cfg" --grid ranks
expect 2 "--eval-capacities value 'nan'" "$moerun" sweep "$cfg" --eval-capacities nan
printf '# axes\nranks=1\nmodel.moe.bpr = false, true\n' >"$tmp/spec.txt"
expect 0 '^p002  ranks=1 model.moe.bpr=true' \
  "$moerun" sweep "$cfg" --spec "$tmp/spec.txt" --dry-run --out "$tmp/s4"
expect 2 "cannot read --spec" "$moerun" sweep "$cfg" --spec "$tmp/missing.txt"
# A point that fails is reported with its log and the sweep exits 1; the others run.
expect 1 'p001 ranks=1 data.dir=/nonexistent .*: train failed \(exit 1\)' \
  "$moerun" sweep "$cfg" --grid ranks=1 --grid data.dir=/nonexistent,/usr/share/datasets/fashion-mnist \
  --grid data.dataset=fashion_mnist --steps 2 --out "$tmp/s5"
# Rerun: the failed point is tried again (the good one kept), its log's problem shown.
expect 1 '^    .*/nonexistent' "$moerun" sweep "$cfg" --grid ranks=1 \
  --grid data.dir=/nonexistent,/usr/share/datasets/fashion-mnist --grid data.dataset=fashion_mnist \
  --steps 2 --out "$tmp/s5"

# --- dry-run ----------------------------------------------------------------------------------
expect 0 '"event":"dry_run".*"params_plan":([0-9]+),"params_rank":\1.*"rank":1,"ranks":4' \
  "$moerun" dry-run "$cfg" --ranks 4 --rank 1 --steps 2
# The all-to-all bytes of the simulated job equal the plan's count (capacity-bound buffers).
out=$("$moerun" dry-run "$cfg" --ranks 4 --rank 2 --micro-batch 2 2>/dev/null)
check "dry-run a2a bytes = plan" "$py" -c "
import json, sys
j = json.loads('''$out''')
assert j['a2a_bytes_per_step'] > 0 and j['plan_bytes'] > 0 and j['loss'] > 0, j
assert j['micro_batch'] == 2 and j['group_images'] == 2, j
"
expect 0 'routing groups of 1 image\(s\) instead of the config.s 2' \
  "$moerun" dry-run "$cfg" --ranks 2 --micro-batch 1 --steps 1
expect 2 "--rank 4: must be between 0 and --ranks - 1 \(3\)" "$moerun" dry-run "$cfg" --ranks 4 --rank 4
expect 2 "--ranks 8: a simulated job of more ranks than experts" "$moerun" dry-run "$cfg" --ranks 8
expect 2 "--ranks 3: " "$moerun" dry-run "$cfg" --ranks 3
expect 2 "run dry-run as one process" "$mpiexec" --oversubscribe -np 2 "$moerun" dry-run "$cfg" --ranks 4
expect 2 "Mod-Squad config" "$moerun" dry-run "$src/configs/tiny_modsquad.pbtxt" --ranks 1
# bf16 moments: the plan counts 4 bytes a parameter for them.
expect 0 '"optimizer_moments":"bf16".*"plan_optimizer_bytes":([0-9]+)' \
  "$moerun" dry-run "$cfg" --ranks 2 -o train.optimizer_moments=BF16 --steps 1

# bf16 moments: stop at 10 + resume to 20 equals 20 straight, bit for bit; a run that keeps
# fp32 moments is told how to resume such a checkpoint.
b16=(-o train.steps=20 -o train.optimizer_moments=BF16)
"$moerun" train "$cfg" "${b16[@]}" -o train.out_dir="$tmp/b1" >/dev/null 2>&1
"$moerun" train "$cfg" "${b16[@]}" -o train.out_dir="$tmp/b2" --until-step 10 >/dev/null 2>&1
"$moerun" train "$cfg" "${b16[@]}" -o train.out_dir="$tmp/b2" >/dev/null 2>&1
check "bf16-moment resume is bitwise" cmp -s "$tmp/b1/checkpoints/step_00000020/shard-00000-of-00001.safetensors" \
  "$tmp/b2/checkpoints/step_00000020/shard-00000-of-00001.safetensors"
check "moments stored as BF16, parameters as F32" "$py" -c "
import json, struct
f = open('$tmp/b1/checkpoints/step_00000020/shard-00000-of-00001.safetensors', 'rb')
n = struct.unpack('<Q', f.read(8))[0]
h = json.loads(f.read(n))
m = [v['dtype'] for k, v in h.items() if k.startswith('optimizer.')]
p = [v['dtype'] for k, v in h.items() if k != '__metadata__' and not k.startswith('optimizer.')]
assert m and set(m) == {'BF16'} and set(p) == {'F32'}, (set(m), set(p))
"
expect 2 "holds the AdamW moments as BF16, this run keeps them as F32: set train.optimizer_moments to BF16" \
  "$moerun" train "$cfg" -o train.steps=30 -o train.out_dir="$tmp/b1"

# --- the plan's projection ----------------------------------------------------------------------
out=$("$moerun" plan "$src/configs/vmoe_15b_every2.pbtxt" --ranks 32 --precision bf16 --json \
  --tflops 500 --a2a-gbps slow=10,fast=100 --allreduce-gbps 20)
check "projection arithmetic" "$py" -c "
import json
j = json.loads('''$out''')
p = j['projection']
micro = j['micro_batch']
assert abs(p['compute_ms'] - j['train_flops_per_image'] * micro / 500e12 * 1e3) < 1e-6 * p['compute_ms']
red = 2 * 31 / 32 * j['params_dense'] * 2
assert abs(p['allreduce_bytes'] - red) < 1, (p['allreduce_bytes'], red)
for name, g in (('slow', 10), ('fast', 100)):
    a = p['a2a'][name]
    assert abs(a['a2a_ms'] - j['a2a_bytes_per_step_per_rank'] / (g * 1e9) * 1e3) < 1e-9 * a['a2a_ms'] + 1e-9
    assert abs(a['step_ms_serial'] - (p['compute_ms'] + a['a2a_ms'] + p['allreduce_ms'])) < 1e-6
    assert abs(a['step_ms_overlapped'] - max(p['compute_ms'], a['a2a_ms'] + p['allreduce_ms'])) < 1e-6
assert p['a2a']['fast']['step_ms_serial'] < p['a2a']['slow']['step_ms_serial']
"
expect 0 'projection +NOT A MEASUREMENT.*' "$moerun" plan "$src/configs/vmoe_15b_every2.pbtxt" --ranks 32
expect 2 "--a2a-gbps 'nccl': give name=GB/s pairs" \
  "$moerun" plan "$cfg" --a2a-gbps nccl
expect 2 "--tflops and --allreduce-gbps must be positive" "$moerun" plan "$cfg" --tflops -1
expect 0 'AdamW moments +[0-9.]+ GiB \(bf16\)' \
  "$moerun" plan "$src/configs/vmoe_15b_every2.pbtxt" --ranks 32 -o train.optimizer_moments=BF16

echo "scaling_test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
