#!/usr/bin/env bash
# The moerun command line: exit codes, messages that name the problem, JSON output.
# usage: cli_test.sh <moerun binary> <source dir> <mpiexec>
set -u
moerun=$1
src=$2
mpiexec=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
# expect <exit code> <regex> <command...>: runs the command, checks its exit code and that
# its combined output matches the regex.
expect() {
  local want_rc=$1 pattern=$2 out rc
  shift 2
  out=$(timeout 120 "$@" 2>&1)
  rc=$?
  if [ "$rc" -ne "$want_rc" ] || ! grep -Eq -- "$pattern" <<<"$out"; then
    echo "FAIL: $* -> rc=$rc (want $want_rc), wanted /$pattern/ in:"
    echo "$out" | head -20
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
}
np2=("$mpiexec" --oversubscribe -np 2)

expect 2 'Usage: moerun <command>' "$moerun"
expect 0 'Commands:' "$moerun" --help
expect 2 "unknown command 'frobnicate'" "$moerun" frobnicate
expect 2 'Targets:' "$moerun" bench
expect 2 "unknown target 'nope'" "$moerun" bench nope
expect 0 'Usage: .*moerun bench comm' "$moerun" bench comm --help
expect 2 "unrecognised option '--bogus'" "$moerun" bench comm --bogus
expect 2 "moerun bench comm: --max-bytes: '12Q' has an unknown unit" "$moerun" bench comm --max-bytes 12Q
expect 2 'larger than --max-bytes' "$moerun" bench comm --min-bytes 1M --max-bytes 4K
expect 2 "--shapes: '512by2048' is not DxM" "$moerun" bench gemm --shapes 512by2048
expect 2 "--ops: unknown collective 'gather'" "$moerun" bench comm --ops gather
expect 0 'world size   1' "$moerun" env
expect 0 '"world_size":2' "${np2[@]}" "$moerun" env --json
# Devices: the backends built and the GPUs seen; --device cuda without a GPU is exit 3 on
# every rank, naming what is missing; an unknown device is a usage error.
expect 0 '"backends":\["cpu"' "$moerun" env --json
expect 0 'backends     cpu' "$moerun" env
if "$moerun" env --json | grep -q '"cuda_devices":0'; then
  expect 3 'no CUDA device is visible to this process.*or use --device cpu|built without the CUDA backend' \
    "$moerun" bench moe-layer --device cuda --steps 1
  expect 3 'no CUDA device is visible|built without the CUDA backend' "${np2[@]}" "$moerun" train --config \
    "$src/configs/fashion_mnist_demo.pbtxt" --device cuda
  expect 3 'no CUDA device is visible|built without the CUDA backend' "$moerun" dry-run --config \
    "$src/configs/tiny_test.pbtxt" --ranks 2 --device cuda
  expect 3 'no CUDA device is visible|built without the CUDA backend' "$moerun" replay-moe \
    --case /nonexistent.safetensors --out /nonexistent-out.safetensors --device cuda
  expect 3 'no CUDA device is visible|built without the CUDA backend' "$moerun" replay-modsquad \
    --case /nonexistent.safetensors --out /nonexistent-out.safetensors --device cuda
  expect 3 'no CUDA device is visible|built without the CUDA backend' "$moerun" bench train \
    --config "$src/configs/tiny_test.pbtxt" --device cuda
  expect 3 'no CUDA device is visible|built without the CUDA backend' "$moerun" bench gemm \
    --device cuda
  expect 3 'no CUDA device is visible|built without the CUDA backend' "${np2[@]}" "$moerun" \
    bench comm --device cuda --max-bytes 64K
  expect 3 'no CUDA device is visible|built without the CUDA backend' "$moerun" bench soak \
    --config "$src/configs/tiny_test.pbtxt" --minutes 0.01 --device cuda
  expect 3 'no CUDA device is visible|built without the CUDA backend' "$moerun" \
    bench checkpoint --config "$src/configs/tiny_test.pbtxt" --device cuda
fi
# A command without a CUDA path says so, and which commands have one.
expect 3 'this command runs on the CPU backend only.*moerun replay-moe. / .replay-modsquad.*bench train.*bench gemm.*bench comm.*bench soak' "$moerun" env \
  --device cuda
expect 2 '--device tpu: use cpu or cuda' "$moerun" bench moe-layer --device tpu
# bench moe-layer at a tiny shape, without and with the overlapped dispatch: the layer's
# fraction of the GEMM limit, and the gain of the overlap on its second line.
out=$("${np2[@]}" "$moerun" bench moe-layer --shapes 32x64 --experts 4 --tokens 256 --steps 1 \
  --bpr 1 --overlap 0,1 2>/dev/null)
if [ "$(grep -c '"bench":"moe-layer"' <<<"$out")" -eq 2 ] &&
  grep -q '"overlap":false.*' <<<"$(head -n 1 <<<"$out")" &&
  grep -q '"overlap_gain"' <<<"$(tail -n 1 <<<"$out")" &&
  grep -q '"layer_fraction_of_gemm_limit"' <<<"$out" &&
  python3 -c "import json,sys,math; ls=[json.loads(l) for l in sys.argv[1].splitlines() if l.startswith('{')]; sys.exit(0 if all(0 < l['layer_fraction_of_shape_gemm'] < 10 and l['shape_gemm_gflops'] > 0 and 0 < l['layer_fraction_of_paired_peak'] < 10 and l['paired_peak_gflops'] > 0 and 0 < l['best_step_ms'] <= l['step_ms'] and 0 < l['busy_ms_min'] <= l['busy_ms_max'] for l in ls) else 1)" "$out"; then
  passed=$((passed + 1))
else
  echo "FAIL: bench moe-layer --overlap 0,1 should print two lines, the second with overlap_gain:"
  echo "$out" | head -5
  failed=$((failed + 1))
fi
expect 2 '--overlap must be 0, 1 or 0,1' "$moerun" bench moe-layer --overlap 2
expect 2 "the option '--config' is required" "$moerun" plan
expect 2 "cannot read config '$tmp/missing.pbtxt'" "$moerun" plan "$tmp/missing.pbtxt"
expect 0 '"params_total":296895347' "$moerun" plan "$src/configs/vmoe_s32_every2.pbtxt" --json
expect 0 '"params_per_rank":' "$moerun" plan "$src/configs/vmoe_15b_every2.pbtxt" --ranks 32 --json
expect 0 '14,705,071,769 total' "$moerun" plan --config "$src/configs/vmoe_15b_every2.pbtxt"
expect 2 '--ranks 3: 3 expert-parallel ranks cannot hold 32 experts.*1, 2, 4, 8, 16, 32, 64' \
  "$moerun" plan "$src/configs/vmoe_15b_every2.pbtxt" --ranks 3
printf 'model {\n  hiden_size: 3\n}\n' >"$tmp/typo.pbtxt"
expect 2 "typo.pbtxt:2:.*hiden_size" "$moerun" plan "$tmp/typo.pbtxt"
printf 'model {\n  moe {\n    k: 9\n  }\n}\n' >"$tmp/bad.pbtxt"
expect 2 "bad.pbtxt:3:5: model.moe.k: 9 must be between 1 and num_experts \(8\)" "$moerun" train --config "$tmp/bad.pbtxt"
expect 2 "--override 'train.stepz=4': train has no field 'stepz'" "$moerun" plan "$src/configs/tiny_test.pbtxt" -o train.stepz=4
# Training end to end (synthetic data), then eval of the saved model with routing overrides.
expect 0 '"event":"final".*"test_accuracy"' "${np2[@]}" "$moerun" train "$src/configs/tiny_test.pbtxt" \
  -o train.steps=20 -o train.out_dir="$tmp/run"
expect 0 '"event":"train"' cat "$tmp/run/metrics.jsonl"
# The synthetic test set shares the training set's classes: a short run generalises.
out=$("${np2[@]}" "$moerun" train "$src/configs/tiny_test.pbtxt" -o train.steps=400 \
  -o train.out_dir="$tmp/syn" 2>/dev/null | tail -n 1)
if python3 -c "import json,sys; sys.exit(0 if json.loads(sys.argv[1])['test_accuracy'] > 0.9 else 1)" "$out"; then
  passed=$((passed + 1))
else
  echo "FAIL: 400 steps on synthetic data should pass 90% test accuracy: $out"
  failed=$((failed + 1))
fi
# Ctrl-C on mpirun stops every rank at the same step; the run commits a checkpoint of that
# step and says so.
"${np2[@]}" "$moerun" train "$src/configs/tiny_test.pbtxt" -o train.steps=1000000 \
  -o train.log_every=100000 -o train.out_dir="$tmp/sig" >"$tmp/sig.log" 2>&1 &
job=$!
# Stop once the run is training (its handlers are installed before it logs "train:"), not
# after a fixed time: on a loaded machine start-up alone can take seconds.
for _ in $(seq 600); do grep -q 'train: ' "$tmp/sig.log" && break; sleep 0.1; done
sleep 1
kill -INT "$job"
wait "$job"
rc=$?
stop_step=$(grep -o 'stopping at step [0-9]*' "$tmp/sig.log" | grep -o '[0-9]*$')
if [ "$rc" -eq 1 ] && grep -q '"interrupted":true' "$tmp/sig.log" && [ -n "$stop_step" ] &&
  [ "$(cat "$tmp/sig/checkpoints/LATEST")" = "$(printf 'step_%08d' "$stop_step")" ]; then
  passed=$((passed + 1))
else
  echo "FAIL: Ctrl-C should stop the run (rc 1, interrupted true, checkpoint of the stop step); rc=$rc:"
  tail -5 "$tmp/sig.log"
  failed=$((failed + 1))
fi
expect 0 '"bpr":1,"capacity_factor":0.5.*"test_accuracy"' "${np2[@]}" "$moerun" eval \
  "$src/configs/tiny_test.pbtxt" --model "$tmp/run/checkpoints" --capacity-factor 0.5,1.0 \
  --bpr 0,1
expect 2 "train.global_batch 9 does not split over 2 ranks" "${np2[@]}" "$moerun" train --config \
  "$src/configs/tiny_test.pbtxt" -o train.global_batch=9 -o train.out_dir="$tmp/run2"
expect 1 "install it with: apt-get install dataset-fashion-mnist" "$moerun" train \
  "$src/configs/tiny_test.pbtxt" -o data.dataset=fashion_mnist -o data.dir="$tmp/nowhere" \
  -o train.out_dir="$tmp/run3"
expect 2 "cannot read|No such file|not found" "$moerun" eval "$src/configs/tiny_test.pbtxt" \
  --model "$tmp/missing.safetensors"
expect 2 "--ranks 3: 3 expert-parallel ranks cannot hold 4 experts" "${np2[@]}" "$moerun" plan \
  "$src/configs/tiny_test.pbtxt" --ranks 3
expect 0 '"activation_bytes_per_rank".*"train_flops_per_image"' "$moerun" plan \
  "$src/configs/vmoe_15b_every2.pbtxt" --ranks 64 --precision bf16 --micro-batch 8 --json
# cluster/mpirun-local binds each rank to its own cores / ranks cores (Open MPI alone binds a
# 1-rank job to one core, halving a 2-thread rank); `moerun env` reports the CPUs.
cores=$(nproc)
cpus_of() { "$src/cluster/mpirun-local" -np "$1" "$moerun" env --json 2>/dev/null |
  python3 -c "import json,sys; print(' '.join(str(json.loads(l)['cpu_count']) for l in sys.stdin))"; }
if [ "$(cpus_of 1)" = "$cores" ] && { [ "$cores" -lt 2 ] || [ "$(cpus_of 2)" = "$((cores / 2)) $((cores / 2))" ]; }; then
  passed=$((passed + 1))
else
  echo "FAIL: mpirun-local binding: -np 1 -> $(cpus_of 1), -np 2 -> $(cpus_of 2) CPUs (host $cores)"
  failed=$((failed + 1))
fi
# ... and lets idle OpenMP threads sleep (they share the cores with OpenBLAS's pool), unless
# the user chose a policy.
expect 0 '"omp_wait_policy":"PASSIVE"' "$src/cluster/mpirun-local" -np 1 "$moerun" env --json
expect 0 '"omp_wait_policy":"ACTIVE"' env OMP_WAIT_POLICY=ACTIVE "$src/cluster/mpirun-local" -np 1 -x OMP_WAIT_POLICY "$moerun" env --json
# The fit list holds the global batch fixed: the same list whatever --ranks is asked about.
fits() { "$moerun" plan "$src/configs/vmoe_15b_every2.pbtxt" --precision bf16 --ranks "$1" --json |
  python3 -c "import json,sys; print(json.load(sys.stdin)['ranks_that_fit'])"; }
if [ "$(fits 4)" = "$(fits 32)" ] && [ "$(fits 32)" = "$(fits 128)" ]; then
  passed=$((passed + 1))
else
  echo "FAIL: plan's fit list depends on --ranks:"; fits 4; fits 32
  failed=$((failed + 1))
fi
# Under mpirun a bad config is reported once (by rank 0), and every rank exits non-zero.
out=$("${np2[@]}" "$moerun" plan "$tmp/bad.pbtxt" 2>&1)
if [ "$(grep -c 'invalid config' <<<"$out")" -ne 1 ]; then
  echo "FAIL: a bad config under mpirun -np 2 should be reported once:"; echo "$out"
  failed=$((failed + 1))
else
  passed=$((passed + 1))
fi
expect 0 '"op":"all_to_all_v","ranks":2.*"verified":"ok"' \
  "${np2[@]}" "$moerun" bench comm --max-bytes 64K --seconds 0.01 --rounds 1
expect 0 '"pass":"fc2_dw".*"peak_gflops"' \
  "$moerun" bench gemm --rows 64 --shapes 32x64 --peak-sizes 64 --seconds 0.01

# Inference capacity: V-MoE's formula (rounded up to multiple_of) unless --exact-capacity:
# at c = 0.25 (groups of 34 tokens, K=2, E=4) that is 8 slots against 5, so more drops.
a=$("${np2[@]}" "$moerun" eval "$src/configs/tiny_test.pbtxt" --model "$tmp/run/checkpoints" \
  --capacity-factor 0.25 2>/dev/null | tail -n 1)
b=$("${np2[@]}" "$moerun" eval "$src/configs/tiny_test.pbtxt" --model "$tmp/run/checkpoints" \
  --capacity-factor 0.25 --exact-capacity 2>/dev/null | tail -n 1)
if python3 -c "
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.exit(0 if b['exact_capacity'] and sum(b['dropped_fraction']) > sum(a['dropped_fraction']) else 1)" "$a" "$b"; then
  passed=$((passed + 1))
else
  echo "FAIL: --exact-capacity should drop more at c=0.25: $a / $b"
  failed=$((failed + 1))
fi
# A short soak: JSON lines with resident memory and step time, a summary, no growth to speak of.
out=$("$moerun" bench soak --config "$src/configs/tiny_test.pbtxt" --minutes 0.1 --report-every 1 \
  --checkpoint-every 50 --dir "$tmp/soak" 2>/dev/null | tail -n 1)
if python3 -c "
import json, sys
j = json.loads(sys.argv[1])
sys.exit(0 if j.get('summary') and j['steps'] > 100 and j['rss_growth_mib'] < 64 else 1)" "$out"; then
  passed=$((passed + 1))
else
  echo "FAIL: bench soak: $out"
  failed=$((failed + 1))
fi
# The demo config routes fixed groups of 8 images: 20 training steps give the same losses
# on 1, 2 and 4 ranks up to float reduction order (gradients summed over ranks in another
# order): within 1e-5 relative.
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] ||
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte ]; then
  for np in 1 2 4; do
    "$mpiexec" --oversubscribe -np "$np" "$moerun" train "$src/configs/fashion_mnist_demo.pbtxt" \
      -o train.steps=20 -o train.log_every=1 -o train.eval_every=0 -o train.eval_batch=96 \
      -o train.out_dir="$tmp/demo$np" >/dev/null 2>&1
  done
  if python3 - "$tmp" <<'EOF2'; then
import json, sys
def losses(np):
    path = f"{sys.argv[1]}/demo{np}/metrics.jsonl"
    return [j["loss"] for j in map(json.loads, open(path)) if j.get("event") == "train"]
ref = losses(1)
assert len(ref) == 20, ref
worst = max(abs(a - b) / abs(b) for np in (2, 4) for a, b in zip(losses(np), ref))
print(f"   demo, 20 steps: worst relative loss difference P=2,4 vs P=1: {worst:.1e}")
sys.exit(0 if worst <= 1e-5 else 1)
EOF2
    passed=$((passed + 1))
  else
    echo "FAIL: demo losses differ between 1, 2 and 4 ranks"
    failed=$((failed + 1))
  fi
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
