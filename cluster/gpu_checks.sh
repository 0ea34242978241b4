#!/usr/bin/env bash
# The GPU checks of issue #11 in one run, on a lent device machine (or any one-GPU host):
# unpacks the bundle of cluster/gpu_bundle.sh, then runs, each under a time limit, with its
# output kept in $OUT (or ./gpu_checks_out): summary.txt (each step's result, its result
# lines, moerun env's output; printed again at the end) and one log per step, 8 files at
# most (what the device tool brings back):
#   1. moerun env (backends, devices), into the summary
#   2. the backend-op table on CUDA against the CPU, then the CUDA backend tests, each
#      program under its own limit
#   3. replay-moe and replay-modsquad on CPU and CUDA: both against the NumPy reference, and
#      CUDA against CPU
#   4. bench moe-layer --device cuda beside the cuBLAS bf16 peak and PyTorch; bench gemm
#      --device cuda (the dense GEMMs: fp32, bf16 with casts, without, FAST_16BF); bench comm
#      --device cuda (NCCL on device buffers, one rank)
#   5. train --device cuda on the demo config (300 steps, then resumed to 320) and on
#      Mod-Squad (100 steps)
#   6. dry-run --device cuda of vmoe_15b_every2 (one rank's share on this GPU)
#   7. bench train --device cuda of V-MoE-B/16 (fp32, then bf16) beside this GPU's GEMM
#      peak (MFU), with what is left of the budget
# Usage (device tool): command "bash cluster/gpu_checks.sh", carry [".gpu"], timeout_s 600.
# Where the device time left (the tool's status, budget_left_s) is under ~11 minutes, the
# call may be cut below 600 s: run "BUDGET_S=<seconds left - 120> bash cluster/gpu_checks.sh"
# so that the summary and its targets block are still printed.
# Everything ends within BUDGET_S (default 570) seconds: each step runs under its own limit
# (in the calls below), cut to what is left of the budget, and a step with under 20 s left
# is skipped with a line in the summary. CHECKS="1 3" runs a subset.
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=$((SECONDS + ${BUDGET_S:-570}))
ulimit -c 0  # no multi-GB core files from a crashed CUDA process
out=${OUT:-gpu_checks_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/summary.txt" 2>&1
orig_ld=${LD_LIBRARY_PATH-}
root=/tmp/moerun-gpu
bundle=.gpu/moerun-gpu.tar.xz
[ -f "$bundle" ] || { echo "gpu_checks: $bundle missing: run cluster/gpu_bundle.sh here first" >&2; exit 1; }
rm -rf "$root" && mkdir -p "$root"
if command -v xz >/dev/null; then
  tar -C "$root" -xJf "$bundle"
else
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$bundle" "$root"
fi
g=$root/.gpu
# The bundle's commit against this tree's: a stale bundle tests old code.
here=$(git rev-parse HEAD 2>/dev/null || echo unknown)
packed=$(cat "$g/REVISION" 2>/dev/null || echo unknown)
echo "gpu_checks: bundle of $packed; tree at $here" | tee -a "$out/summary.txt"
if [ "$here" != unknown ] && [ "${packed%% *}" != "$here" ]; then
  echo "gpu_checks: WARNING: the bundle is not of this tree's commit" | tee -a "$out/summary.txt"
fi
# CUDA's libraries: the toolkit's, else pip's nvidia-* packages (NCCL is only there on the
# device image).
cuda_libs=""
site=$(python3 -c "import nvidia, os; print(list(nvidia.__path__)[0])" 2>/dev/null || true)
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
  found=""
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/$lib" ] && { found=$d; break; }
  done
  if [ -z "$found" ] && [ -n "$site" ]; then
    found=$(find "$site" -name "$lib" -printf '%h\n' 2>/dev/null | head -n 1)
  fi
  if [ -z "$found" ]; then  # the loader's cache, then anywhere under an nvidia directory
    found=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}')
    [ -n "$found" ] && found=$(dirname "$found")
  fi
  if [ -z "$found" ]; then
    found=$(find / -xdev -name "$lib" -path '*nvidia*' -printf '%h\n' 2>/dev/null | head -n 1)
  fi
  [ -n "$found" ] && [[ ":$cuda_libs:" != *":$found:"* ]] && cuda_libs="$cuda_libs:$found"
done
export LD_LIBRARY_PATH="$g/lib$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Open MPI from the bundle, as a singleton (no orted, no ssh).
export OPAL_PREFIX=$g/ompi OPAL_PKGLIBDIR=$g/ompi/lib/openmpi3 OPAL_PKGDATADIR=$g/ompi/share/openmpi
export OPAL_SYSCONFDIR=$g/ompi/etc OPAL_BINDIR=$g/ompi/bin OMPI_MCA_ess_singleton_isolated=1
export OMP_WAIT_POLICY=passive GLOG_logtostderr=1
# bench moe-layer's PyTorch peer and the reference scripts run with the machine's own
# libraries (its LD_LIBRARY_PATH as it was: the driver may be found through it), not the
# bundle's.
# The wrapper reads the saved value from the environment (no quoting of it into the script).
export MOERUN_ORIG_LD_LIBRARY_PATH=$orig_ld
cat >"$root/python3" <<'EOF'
#!/bin/sh
if [ -n "$MOERUN_ORIG_LD_LIBRARY_PATH" ]; then
  exec env -u OPAL_PREFIX LD_LIBRARY_PATH="$MOERUN_ORIG_LD_LIBRARY_PATH" python3 "$@"
fi
exec env -u OPAL_PREFIX -u LD_LIBRARY_PATH python3 "$@"
EOF
chmod +x "$root/python3"
export MOERUN_PYTHON=$root/python3
# PyTorch's libraries read once now, off the clock of bench moe-layer's first peer.
"$root/python3" -c 'import torch' >/dev/null 2>&1 &
moerun=$g/bin/moerun
# Libraries that would not load: said first, in the summary.
missing=$(ldd "$moerun" "$g"/bin/*_tests 2>/dev/null | grep "not found" | sort -u)
[ -z "$missing" ] || echo "gpu_checks: libraries not found: $missing" | tee -a "$out/summary.txt"
checks=${CHECKS:-1 2 3 4 5 6 7}
failed=0
step_rc=0 step_first=1

# step NAME LIMIT_S COMMAND...: runs it, its output to $out/NAME.log (GPU_CHECKS_LOG=other:
# appended to $out/other.log instead), and says how it went.
step() {
  local name=$1 limit=$2 log="$out/${GPU_CHECKS_LOG:-$1}.log"
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "gpu_checks: $name skipped: ${left} s left of the budget" | tee -a "$out/summary.txt"
    failed=1
    step_rc=0
    step_first=$(($( [ -f "$log" ] && wc -l <"$log" || echo 0) + 1))
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local t0=$SECONDS
  local first=1
  [ -f "$log" ] && first=$(($(wc -l <"$log") + 1))
  echo "=== $name" >>"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  step_rc=$rc step_first=$first
  echo "gpu_checks: $name rc=$rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/summary.txt"
  # The step's result lines in the summary: bench, dry-run, evaluation and a run's final
  # JSON lines, gtest's totals and failures, the replay's ok/FAIL lines, the tests' "record:"
  # lines (which cuBLAS paths ran).
  tail -n +"$first" "$log" | grep -E '"(bench|event)": ?"(moe-layer|moe-layer-torch|gemm|comm|train|dry_run|eval|final)"|^\[  (PASSED|FAILED) |^\[==========\] .* ran|^\[  SKIPPED \] [A-Z]|^(ok  |FAIL) |^[0-9]+ passed, [0-9]+ failed|skipped|^record: |^========= (Invalid|Program hit|ERROR SUMMARY|    at .* in )' \
    >>"$out/summary.txt" || true
  [ $rc -eq 0 ] || { failed=1; tail -n +"$first" "$log" | tail -n 15; }
}

# The limits of the steps before the last sum to 540 s of the 570 s budget (a memcheck rerun,
# only after a crash, takes from the later steps), so the last (bench train) has at least
# 30 s; a step that ends early leaves its time to the later ones (the last takes what is
# left).
if [[ " $checks " == *" 1 "* ]]; then
  # moerun env's output goes into the summary (no file of its own: 8 files come back).
  step env 20 "$moerun" env
  cat "$out/env.log" >>"$out/summary.txt" && rm -f "$out/env.log"
fi
# sanitize NAME LOG COMMAND...: after the step NAME (its output in $out/LOG.log) ended on a
# signal or a CUDA error (an illegal address, a failed launch: none of our kernels has run
# on a GPU before), runs COMMAND under compute-sanitizer's memcheck, into the same log: it
# names the kernel and the bad access. A GoogleTest program runs only the test it crashed
# in (the last one started). Where the machine refuses the sanitizer (gVisor: "Device not
# supported") that is all it prints.
sanitize() {
  local name=$1 log="$out/$2.log"
  shift 2
  local crashed=0
  if [ "$step_rc" -ge 128 ] && [ "$step_rc" -ne 137 ]; then crashed=1; fi  # 137: timeout's kill
  if [ "$step_rc" -ne 0 ] && tail -n +"$step_first" "$log" |
    grep -qE 'illegal memory access|misaligned address|unspecified launch failure|illegal instruction|an illegal|CUDA error|EXECUTION_FAILED'; then
    crashed=1
  fi
  [ $crashed -eq 1 ] || return 0
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [ -z "$sanitizer" ]; then
    echo "gpu_checks: $name: no compute-sanitizer on this machine" | tee -a "$out/summary.txt"
    return 0
  fi
  local test
  test=$(tail -n +"$step_first" "$log" | grep -E '^\[ RUN      \] ' | tail -n 1 | awk '{print $NF}')
  local filter=()
  [ -z "$test" ] || filter=(--gtest_filter="$test")
  GPU_CHECKS_LOG=$(basename "$log" .log) step "${name}_memcheck" 45 "$sanitizer" --tool memcheck \
    --print-limit 10 "$@" "${filter[@]}"
}

if [[ " $checks " == *" 2 "* ]]; then
  # The op table against the CPU first (the most informative), then the backend's own tests;
  # each under its own limit, so that one hanging does not hide the other. A program that
  # crashes runs its crashing test again under compute-sanitizer.
  step ops_tests 60 "$g/bin/device_ops_cuda_tests"
  sanitize ops_tests ops_tests "$g/bin/device_ops_cuda_tests"
  step backend_tests 60 "$g/bin/cuda_backend_tests"
  sanitize backend_tests backend_tests "$g/bin/cuda_backend_tests"
fi
if [[ " $checks " == *" 3 "* ]]; then
  mkdir -p "$g/cases"
  # Each replay run under 30 s (a hang costs one run, not the step). V-MoE's layer, then
  # Mod-Squad's (the MoE MLP and attention), into the same log.
  REPLAY_TIMEOUT_S=30 step replay 70 bash tests/reference/replay_devices.sh "$moerun" \
    "$root/python3" "$g/cases" cpu cuda
  REPLAY_TIMEOUT_S=30 REPLAY_KIND=modsquad GPU_CHECKS_LOG=replay step replay_modsquad 35 \
    bash tests/reference/replay_devices.sh "$moerun" "$root/python3" "$g/cases" cpu cuda
fi
if [[ " $checks " == *" 4 "* ]]; then
  # Vanilla and BPR routing (the PyTorch peer routes as vanilla), 20 timed steps a case
  # after ~200 ms of warm-up.
  step bench_moe_layer 90 "$moerun" bench moe-layer --device cuda --steps 20
  # The dense GEMMs of V-MoE-B/16 fp32, bf16 with its casts, the bf16 GEMM alone and
  # cuBLAS's FAST_16BF (which of them train.precision BF16 should use), into the same log.
  GPU_CHECKS_LOG=bench_moe_layer step bench_gemm 30 "$moerun" bench gemm --device cuda \
    --seconds 0.03
  # The NCCL communicator's collectives on device buffers beside NCCL's own calls (one rank:
  # the data paths and the check, not a bandwidth).
  GPU_CHECKS_LOG=bench_moe_layer step bench_comm 10 "$moerun" bench comm --device cuda \
    --max-bytes 16M --seconds 0.01 --rounds 3
fi
if [[ " $checks " == *" 5 "* ]]; then
  data=$g/data
  GPU_CHECKS_LOG=train step train_demo 60 "$moerun" train --config "$g/configs/fashion_mnist_demo.pbtxt" \
    --device cuda -o train.steps=300 -o data.dir="$data" --checkpoint-dir "$root/ck_demo"
  # A crash there: two steps again under the memory checker, from no checkpoint.
  sanitize train_demo train "$moerun" train --config "$g/configs/fashion_mnist_demo.pbtxt" \
    --device cuda -o train.steps=2 -o train.eval_every=0 -o data.dir="$data" \
    --checkpoint-dir "$root/ck_memcheck"
  # Resumed on the GPU (the checkpoint's state copied back to the device), 20 steps more:
  # its final line has steps_this_run 20.
  GPU_CHECKS_LOG=train step train_demo_resume 15 "$moerun" train \
    --config "$g/configs/fashion_mnist_demo.pbtxt" --device cuda -o train.steps=320 \
    -o data.dir="$data" --checkpoint-dir "$root/ck_demo"
  GPU_CHECKS_LOG=train step train_modsquad 50 "$moerun" train \
    --config "$g/configs/modsquad_fashion_mnist.pbtxt" --device cuda -o train.steps=100 \
    -o data.dir="$data" --checkpoint-dir "$root/ck_modsquad"
fi
if [[ " $checks " == *" 6 "* ]]; then
  step dry_run_15b 40 "$moerun" dry-run --config "$g/configs/vmoe_15b_every2.pbtxt" --ranks 32 \
    --rank 5 --micro-batch 1 -o train.optimizer_moments=BF16 --device cuda
fi
if [[ " $checks " == *" 7 "* ]]; then
  step bench_train 570 bash -c "'$moerun' bench train --config '$g/configs/vmoe_b16_every2.pbtxt' \
    --device cuda --batch 32 --steps 5; a=\$?; '$moerun' bench train --config \
    '$g/configs/vmoe_b16_every2.pbtxt' --device cuda --batch 32 --steps 5 \
    -o train.precision=BF16 && exit \$a"
fi
echo "gpu_checks: done, failed=$failed; logs in $out" >>"$out/summary.txt"
# The targets of issue #11 read off the summary, at its end (cluster/gpu_targets.py).
"$root/python3" cluster/gpu_targets.py "$out/summary.txt" >"$out/targets.tmp" 2>&1 ||
  echo "gpu_checks: gpu_targets.py failed" >>"$out/targets.tmp"
cat "$out/targets.tmp" >>"$out/summary.txt" && rm -f "$out/targets.tmp"
# The summary as the command's output too (the device tool returns its last 12,000
# characters even where files are left out): the targets block comes last.
echo "===== summary"
cat "$out/summary.txt"
exit $failed
