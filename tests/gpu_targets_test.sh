#!/usr/bin/env bash
# cluster/gpu_targets.py, the block the GPU checks end with: on a summary made up here (its
# verdicts known: 0.714 of peak passes 0.70, 0.57 does not; 2.0x passes 1.5x), the right
# rows, verdicts, totals and failed steps; and the fields it reads are the ones bench
# moe-layer --device cuda, bench gemm --device cuda and bench train print.
# Usage: gpu_targets_test.sh PYTHON SOURCE_DIR
set -euo pipefail
py=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/summary.txt" <<'SUMMARY'
name, memory.total [MiB], driver_version
NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04
gpu_checks: env rc=0 in 1 s (limit 20 s)
gpu_checks: ops_tests rc=0 in 12 s (limit 60 s)
[  PASSED  ] 40 tests.
gpu_checks: backend_tests rc=1 in 12 s (limit 60 s)
[  PASSED  ] 20 tests.
[  FAILED  ] 2 tests, listed below:
8 passed, 1 failed (devices: cpu cuda; replay-moe)
6 passed, 0 failed (devices: cpu cuda)
gpu_checks: replay rc=1 in 30 s (limit 70 s)
{"bench":"moe-layer-torch","torch":"2.11","step_ms":3.0}
{"bench":"moe-layer","d":512,"m":2048,"e":8,"k":2,"bpr":false,"step_ms":1.5,"expert_gemm_tflops":500.1,"cublas_bf16_peak_tflops":700.0,"expert_gemm_fraction_of_peak":0.714,"fused_bias_gelu":true,"torch_step_ms":3.0,"speedup_vs_torch":2.0}
{"bench":"moe-layer","d":768,"m":3072,"e":32,"k":2,"bpr":true,"step_ms":1.5,"expert_gemm_tflops":400.1,"cublas_bf16_peak_tflops":700.0,"expert_gemm_fraction_of_peak":0.57,"fused_bias_gelu":false}
gpu_checks: bench_moe_layer rc=0 in 50 s (limit 90 s)
{"bench":"gemm","pass":"fwd","m":4096,"n":2304,"k":768,"tflops":{"fp32":50.5,"bf16":300.25,"bf16_gemm":400,"fast16bf":null}}
{"bench":"train","precision":"bf16","mfu":0.3125}
gpu_checks: dry_run_15b skipped: 10 s left of the budget
SUMMARY
"$py" "$src/cluster/gpu_targets.py" "$tmp/summary.txt" >"$tmp/out.txt"
cat "$tmp/out.txt"
expect() {
  grep -qE -- "$1" "$tmp/out.txt" || { echo "FAIL: no line matching: $1" >&2; exit 1; }
}
expect '^gpu: NVIDIA H100 80GB HBM3'
expect 'peak 700 TFLOP/s'
expect '^  512x2048 +8  vanilla +500\.1  0\.71 ok +1\.500  2\.00 ok +True$'
expect '^  768x3072 +32  bpr +400\.1  0\.57 BELOW +1\.500  - +False$'
expect '^  fwd 4096x2304x768: 50\.5 / 300\.2 / 400\.0 / -$'
expect '^bench train: precision bf16, mfu 0\.312$'
expect '^gtest: failed 2$'
expect '^replay-moe \(cpu cuda\): 8 passed, 1 failed$'
expect '^replay \(cpu cuda\): 6 passed, 0 failed$'
expect '^steps: 5 ran, 2 failed: backend_tests \(rc 1\), replay \(rc 1\); skipped: dry_run_15b$'
# Without any moe-layer line it says so instead of a table.
grep -v '"moe-layer"' "$tmp/summary.txt" >"$tmp/none.txt"
"$py" "$src/cluster/gpu_targets.py" "$tmp/none.txt" >"$tmp/none_out.txt"
grep -q '^bench moe-layer: no result line' "$tmp/none_out.txt" ||
  { echo "FAIL: no 'no result line' without moe-layer lines" >&2; exit 1; }
# Each JSON field the script reads is one the benchmarks print.
for f in expert_gemm_fraction_of_peak cublas_bf16_peak_tflops expert_gemm_tflops step_ms \
  speedup_vs_torch fused_bias_gelu bpr; do
  grep -q "\"$f\"" "$src/launch/cmd_bench_moe_layer_cuda.cc" ||
    { echo "FAIL: bench moe-layer --device cuda prints no \"$f\"" >&2; exit 1; }
done
for f in pass tflops fp32 bf16 bf16_gemm fast16bf; do
  grep -q "\"$f\"" "$src/launch/cmd_bench_gemm_cuda.cc" ||
    { echo "FAIL: bench gemm --device cuda prints no \"$f\"" >&2; exit 1; }
done
for f in precision mfu; do
  grep -q "\"$f\"" "$src/launch/cmd_bench_train.cc" ||
    { echo "FAIL: bench train prints no \"$f\"" >&2; exit 1; }
done
grep -q '"skipped"' "$src/launch/moe_layer_torch.py" ||
  { echo "FAIL: the PyTorch peer prints no \"skipped\"" >&2; exit 1; }
echo "gpu_targets: ok"
