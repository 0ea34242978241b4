#!/usr/bin/env bash
# Checkpoints end to end through the CLI under a real mpirun: bitwise resume, resharding to
# other rank counts (online and offline), export / import and the Python safetensors
# package, bad checkpoints, kill -9 in the middle of a save, signals, a full disk, a
# non-finite loss, async and time-based saves, --keep.
# usage: checkpoint_test.sh <moerun binary> <source dir> <mpiexec> [python3]
set -u
moerun=$1
src=$2
mpiexec=$3
python=${4:-python3}
tmp=$(mktemp -d)
mounted=""
cleanup() {
  [ -n "$mounted" ] && umount "$mounted" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() {
  failed=$((failed + 1))
  echo "FAIL $*"
}
cfg=$src/configs/tiny_test.pbtxt
# Router noise (noise_std 1), BPR and augmentation on; a fixed group size (2 images) so that
# 1, 2, 4 and 8 ranks route the same groups; 16 images per step.
common=(-o train.steps=20 -o train.log_every=1 -o data.augment=true -o model.moe.group_size=34
  -o train.global_batch=16 -o train.eval_every=0 -o train.eval_batch=2048
  -o data.synthetic_test_size=256)
train() {  # train NP OUT_DIR [args...]: output in OUT_DIR.log, exit code returned
  local np=$1 out=$2
  shift 2
  timeout 300 "$mpiexec" --oversubscribe -np "$np" "$moerun" train "$cfg" "${common[@]}" \
    -o train.out_dir="$out" "$@" >"$out.log" 2>&1
}
losses() {  # the "step loss" pairs of a metrics file
  grep '"event":"train"' "$1" | sed -E 's/.*"loss":([^,]*),.*"step":([0-9]+).*/\2 \1/'
}
have_py=0
"$python" -c "import safetensors, numpy" 2>/dev/null && have_py=1

# --- 1. Bitwise resume at P = 2 and P = 4 -------------------------------------------------
for np in 2 4; do
  d=$tmp/p$np
  train "$np" "$d-straight" && train "$np" "$d-resumed" --until-step 10 &&
    train "$np" "$d-resumed" || bad "P=$np runs failed: $(tail -n 3 "$d-resumed.log")"
  if grep -q "resuming from .*step_00000010" "$d-resumed.log" &&
    diff <(losses "$d-straight/metrics.jsonl") <(losses "$d-resumed/metrics.jsonl") >/dev/null &&
    [ "$(losses "$d-resumed/metrics.jsonl" | wc -l)" -eq 20 ]; then
    ok "P=$np: 10 + resume + 10 steps log the same 20 losses as 20 straight"
  else
    bad "P=$np: resumed losses differ:"
    diff <(losses "$d-straight/metrics.jsonl") <(losses "$d-resumed/metrics.jsonl") | head
  fi
  same=1
  for f in "$d-straight"/checkpoints/step_00000020/shard-*.safetensors; do
    cmp -s "$f" "$d-resumed/checkpoints/step_00000020/$(basename "$f")" || same=0
  done
  if [ "$same" -eq 1 ]; then
    ok "P=$np: final shards (parameters and AdamW moments) byte-identical"
  else
    bad "P=$np: final shards differ"
  fi
done

# --- 2. Reshard online: saved at P=2 (step 10), resumed at P=4, 1 and 8 (replicas) --------
saved=$tmp/p2-saved
mkdir -p "$saved" && cp -r "$tmp/p2-resumed/checkpoints/step_00000010" "$saved/"
for q in 4 1 8; do
  train "$q" "$tmp/q$q-straight" || bad "Q=$q straight run failed: $(tail -n 3 "$tmp/q$q-straight.log")"
  train "$q" "$tmp/q$q-from2" --resume "$saved/step_00000010" ||
    bad "Q=$q resume failed: $(tail -n 3 "$tmp/q$q-from2.log")"
  if "$python" - "$tmp/q$q-straight/metrics.jsonl" "$tmp/q$q-from2/metrics.jsonl" <<'EOF'; then
import json, sys
def losses(path):
    return {j["step"]: j["loss"] for j in map(json.loads, open(path)) if j.get("event") == "train"}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
steps = range(11, 21)
worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
print(f"   worst relative loss difference over steps 11-20: {worst:.2e}")
sys.exit(0 if worst <= 1e-5 and min(b) == 11 else 1)
EOF
    ok "saved at P=2, resumed at Q=$q: steps 11-20 agree with a straight Q=$q run (<= 1e-5)"
  else
    bad "resharded P=2 -> Q=$q losses disagree"
  fi
done
grep -q "written by 2 rank(s), now 8" "$tmp/q8-from2.log" && ok "Q=8 (2 replicas of 4 experts) loads P=2's checkpoint" ||
  bad "Q=8 did not say it resharded"

# --- 3. Offline reshard; export; Python ------------------------------------------------------
"$moerun" reshard --in "$saved/step_00000010" --ranks 4 --out "$tmp/r4" >"$tmp/r4.log" 2>&1 &&
  "$moerun" checkpoint verify "$tmp/r4" >/dev/null 2>&1 &&
  [ "$(ls "$tmp"/r4/step_00000010/shard-*-of-00004.safetensors | wc -l)" -eq 4 ] &&
  ok "reshard --ranks 4 writes 4 shards that verify" || bad "reshard: $(cat "$tmp/r4.log")"
"$moerun" reshard --in "$saved/step_00000010" --ranks 3 --out "$tmp/r3" >"$tmp/r3.log" 2>&1
[ $? -eq 2 ] && grep -q "3 expert-parallel ranks cannot hold 4 experts" "$tmp/r3.log" && [ ! -e "$tmp/r3/LATEST" ] &&
  ok "reshard --ranks 3 is refused, naming the rank counts" || bad "reshard --ranks 3: $(cat "$tmp/r3.log")"
train 4 "$tmp/q4-fromr4" --resume "$tmp/r4" &&
  diff <(losses "$tmp/q4-from2/metrics.jsonl") <(losses "$tmp/q4-fromr4/metrics.jsonl") >/dev/null &&
  ok "resuming the offline-resharded checkpoint at 4 ranks equals resuming the original" ||
  bad "offline-resharded resume differs"
"$moerun" export --checkpoint "$saved/step_00000010" --out "$tmp/orig.safetensors" >/dev/null 2>&1 &&
  "$moerun" export --checkpoint "$tmp/r4" --out "$tmp/r4.safetensors" >/dev/null 2>&1 ||
  bad "export failed"
total=$("$moerun" plan "$cfg" --json | sed -E 's/.*"params_total":([0-9]+).*/\1/')
if [ "$have_py" -eq 1 ]; then
  if "$python" - "$tmp/orig.safetensors" "$tmp/r4.safetensors" "$total" <<'EOF'; then
import sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert sorted(a) == sorted(b), "names differ"
assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
           a[k].tobytes() == b[k].tobytes() for k in a), "values differ"
total = sum(v.size for v in a.values())
assert total == int(sys.argv[3]), f"{total} parameters, plan says {sys.argv[3]}"
assert a["blocks.1.mlp.experts.3.fc1.weight"].shape == (32, 16)
assert a["blocks.1.mlp.router.weight"].shape == (4, 16)
assert a["pos_embed"].shape == (1, 17, 16)
assert not any(k.startswith("optimizer.") for k in a)
with safe_open(sys.argv[1], "np") as f:
    meta = f.metadata()
assert 'name: "tiny_test"' in meta["moerun_config"] and meta["step"] == "10"
print(f"   {len(a)} tensors, {total} parameters")
EOF
    ok "export loads with Python safetensors: names, shapes, total = plan; resharded export is bitwise equal"
  else
    bad "Python check of the export"
  fi
else
  echo "skip Python checks (no safetensors/numpy)"
fi

# --- 4. Import, eval of a directory and of a file ------------------------------------------
"$moerun" import --in "$tmp/orig.safetensors" --config "$cfg" --out "$tmp/imp" >/dev/null 2>&1 &&
  "$moerun" checkpoint info "$tmp/imp" | grep -q '"optimizer_state":false.*"step":0' &&
  train 2 "$tmp/fromimp" --resume "$tmp/imp" -o train.steps=3 &&
  grep -q '"event":"final".*"steps":3' "$tmp/fromimp.log" &&
  ok "import makes a step-0 checkpoint without optimizer state that trains" ||
  bad "import: $(tail -n 3 "$tmp/fromimp.log")"
"$moerun" import --in "$tmp/orig.safetensors" --config "$cfg" -o model.hidden_size=32 -o model.num_heads=2 \
  --out "$tmp/imp2" >"$tmp/imp2.log" 2>&1
[ $? -eq 1 ] && grep -q "tensor 'patch_embed.proj.weight': shape is \[16, 1, 7, 7\], expected \[32, 1, 7, 7\]" "$tmp/imp2.log" && [ ! -e "$tmp/imp2" ] &&
  ok "import into another model's config names the tensor and shape, writes nothing" ||
  bad "import mismatch: $(cat "$tmp/imp2.log")"
if [ "$have_py" -eq 1 ]; then
  "$python" -c "
import sys
from safetensors.numpy import load_file, save_file
t = load_file(sys.argv[1]); t['head.bias'] = t['head.bias'].astype('float64'); save_file(t, sys.argv[2])
" "$tmp/orig.safetensors" "$tmp/f64.safetensors"
  "$moerun" import --in "$tmp/f64.safetensors" --config "$cfg" --out "$tmp/imp3" >"$tmp/imp3.log" 2>&1
  [ $? -eq 1 ] && grep -q "tensor 'head.bias': dtype is F64, expected F32" "$tmp/imp3.log" &&
    ok "import of a wrong dtype names the tensor" || bad "dtype mismatch: $(cat "$tmp/imp3.log")"
fi
for m in "$saved/step_00000010" "$tmp/orig.safetensors"; do
  timeout 120 "$mpiexec" --oversubscribe -np 2 "$moerun" eval "$cfg" "${common[@]}" --model "$m" \
    >"$tmp/eval.log" 2>&1 && grep -q '"test_accuracy"' "$tmp/eval.log" &&
    ok "eval accepts $(basename "$m")" || bad "eval of $m: $(tail -n 3 "$tmp/eval.log")"
done

# --- 5. Bad checkpoints: each named, nothing loaded -----------------------------------------
corrupt() {  # corrupt NAME: a fresh copy of the saved checkpoint
  rm -rf "$tmp/$1" && cp -r "$saved/step_00000010" "$tmp/$1" && echo "$tmp/$1"
}
expect_bad() {  # expect_bad WHAT DIR REGEX: verify exits 1, resume exits 2, both match
  local what=$1 dir=$2 re=$3 v r
  v=$("$moerun" checkpoint verify "$dir" 2>&1)
  local vrc=$?
  train 2 "$tmp/bad-run" --resume "$dir"
  local rrc=$?
  r=$(cat "$tmp/bad-run.log")
  if [ $vrc -eq 1 ] && [ $rrc -eq 2 ] && grep -Eq "$re" <<<"$v" && grep -Eq "$re" <<<"$r" &&
    [ ! -e "$tmp/bad-run/checkpoints/LATEST" ]; then
    ok "$what: verify exits 1 and resume exits 2, naming it"
  else
    bad "$what: verify rc=$vrc resume rc=$rrc: $v / $(grep moerun <<<"$r" | head -2)"
  fi
  rm -rf "$tmp/bad-run"
}
c=$(corrupt trunc)
shard=$c/shard-00001-of-00002.safetensors
truncate -s -100 "$shard"
expect_bad "truncated shard" "$c" "shard-00001-of-00002.safetensors.*truncated"
c=$(corrupt flip)
shard=$c/shard-00000-of-00002.safetensors
size=$(stat -c %s "$shard")
printf '\x5a' | dd of="$shard" bs=1 seek=$((size - 7)) conv=notrunc status=none
expect_bad "one flipped byte" "$c" "shard-00000-of-00002.safetensors: tensor '[^']+'.*checksum mismatch"
c=$(corrupt missing)
rm "$c/shard-00001-of-00002.safetensors"
expect_bad "missing shard" "$c" "shard-00001-of-00002.safetensors: cannot open.*missing a shard"
c=$(corrupt nomanifest)
rm "$c/manifest.pb"
train 2 "$tmp/bad-run" --resume "$c"
[ $? -eq 2 ] && grep -q "not a checkpoint (no manifest.pb" "$tmp/bad-run.log" &&
  ok "a directory without a manifest is never loaded" || bad "no manifest: $(tail -2 "$tmp/bad-run.log")"
rm -rf "$tmp/bad-run"
train 2 "$tmp/other" --resume "$saved/step_00000010" -o model.hidden_size=32
[ $? -eq 2 ] && grep -q "another model.*" "$tmp/other.log" && grep -q "hidden_size: 16 -> 32" "$tmp/other.log" &&
  ok "resume with another model's config names the field" || bad "other model: $(grep -A3 moerun "$tmp/other.log" | head)"
timeout 60 "$mpiexec" --oversubscribe -np 2 "$moerun" eval "$cfg" -o model.mlp_dim=64 \
  --model "$saved/step_00000010" >"$tmp/eval2.log" 2>&1
[ $? -eq 2 ] && grep -q "mlp_dim: 32 -> 64" "$tmp/eval2.log" &&
  ok "eval with another model's config names the field" || bad "eval other model: $(cat "$tmp/eval2.log" | head -5)"
train 2 "$tmp/p2-straight" --resume never
[ $? -eq 2 ] && grep -q "already holds checkpoints" "$tmp/p2-straight.log" &&
  ok "--resume never over existing checkpoints is refused" || bad "--resume never"

# --- 6. kill -9 of one rank in the middle of a save -----------------------------------------
k=$tmp/kill
MOERUN_TEST_SAVE_PAUSE=10:60 timeout 300 "$mpiexec" --oversubscribe -np 2 "$moerun" train "$cfg" \
  "${common[@]}" -o train.out_dir="$k" --checkpoint-every 5 >"$k.log" 2>&1 &
job=$!
pid=""
for _ in $(seq 1 100); do
  pid=$(grep -o 'test hook: pid [0-9]*' "$k.log" | head -n 1 | grep -o '[0-9]*$')
  [ -n "$pid" ] && break
  sleep 0.2
done
[ -n "$pid" ] && kill -9 "$pid"
wait "$job"
rc=$?
if [ -n "$pid" ] && [ $rc -ne 0 ] && [ "$(cat "$k/checkpoints/LATEST")" = step_00000005 ] &&
  [ -d "$k/checkpoints/step_00000010.tmp" ] && "$moerun" checkpoint verify "$k/checkpoints" >/dev/null 2>&1; then
  ok "kill -9 during the save of step 10: LATEST still names step 5, which verifies"
else
  bad "kill -9 mid-save: rc=$rc pid=$pid LATEST=$(cat "$k/checkpoints/LATEST" 2>&1)"
fi
train 2 "$k" -o train.steps=12
if [ $? -eq 0 ] && grep -q "removed .*step_00000010.tmp" "$k.log" &&
  grep -q "resuming from .*step_00000005" "$k.log" && [ ! -e "$k/checkpoints/step_00000010.tmp" ]; then
  ok "the next start removes the unfinished save and resumes from step 5"
else
  bad "restart after kill: $(grep -E 'removed|resum|moerun' "$k.log" | head -3)"
fi

# --- 7. Signals through a real mpirun --------------------------------------------------------
# wait_for JOB: waits up to 60 s for a background job, then kills it (never hangs the test).
wait_for() {
  local job=$1
  for _ in $(seq 1 300); do
    kill -0 "$job" 2>/dev/null || break
    sleep 0.2
  done
  kill -0 "$job" 2>/dev/null && { kill -9 "$job"; pkill -9 -f "train.out_dir=$2" 2>/dev/null; }
  wait "$job"
}
# stopped_ok NAME LOG DIR SIGNAL RC: every rank stopped at one step and committed it.
stopped_ok() {
  local stop
  stop=$(grep -o "$4: stopping at step [0-9]*" "$2" | grep -o '[0-9]*$')
  if [ "$5" -eq 1 ] && [ -n "$stop" ] &&
    [ "$(cat "$3/checkpoints/LATEST" 2>/dev/null)" = "$(printf 'step_%08d' "$stop")" ] &&
    "$moerun" checkpoint verify "$3/checkpoints" >/dev/null 2>&1; then
    ok "$1: every rank stops at step $stop and commits its checkpoint"
  else
    bad "$1: rc=$5 stop=$stop: $(tail -n 3 "$2")"
  fi
}
# wait_log FILE PATTERN: until the log shows PATTERN (30 s at most).
wait_log() {
  for _ in $(seq 1 300); do
    grep -q "$2" "$1" 2>/dev/null && return
    sleep 0.1
  done
}
long=(-o train.steps=1000000 -o train.log_every=100)
# SIGUSR1 (what sbatch --signal sends) to mpirun, which forwards it to the ranks.
s=$tmp/usr1
"$mpiexec" --oversubscribe -np 2 "$moerun" train "$cfg" "${common[@]}" "${long[@]}" \
  -o train.out_dir="$s" >"$s.log" 2>&1 &
job=$!
wait_log "$s.log" "step 100/"
kill -USR1 "$job"
wait_for "$job" "$s"
stopped_ok "SIGUSR1 to mpirun" "$s.log" "$s" SIGUSR1 $?
# SIGTERM to cluster/mpirun-local, with a save that takes 3 s (longer than Open MPI waits
# before it kills ranks after a SIGTERM to mpirun itself).
s=$tmp/term
MOERUN_TEST_SAVE_PAUSE=-1:3 "$src/cluster/mpirun-local" -np 2 "$moerun" train "$cfg" \
  "${common[@]}" "${long[@]}" -o train.out_dir="$s" >"$s.log" 2>&1 &
job=$!
wait_log "$s.log" "step 100/"
kill -TERM "$job"
wait_for "$job" "$s"
stopped_ok "SIGTERM to cluster/mpirun-local (3 s save)" "$s.log" "$s" SIGUSR1 $?
# Ctrl-C typed in a terminal (tmux) running cluster/mpirun-local.
if command -v tmux >/dev/null; then
  s=$tmp/ctrlc
  printf '%s\n' "MOERUN_TEST_SAVE_PAUSE=-1:3 '$src/cluster/mpirun-local' -np 2 '$moerun' train '$cfg' ${common[*]} ${long[*]} -o train.out_dir='$s' >'$s.log' 2>&1; echo \$? >'$s.rc'" >"$s.sh"
  sock=$tmp/tmux.sock
  tmux -S "$sock" new-session -d -s ctrlc "bash '$s.sh'; sleep 60"
  wait_log "$s.log" "step 100/"
  tmux -S "$sock" send-keys -t ctrlc C-c
  for _ in $(seq 1 300); do
    [ -s "$s.rc" ] && break
    sleep 0.2
  done
  tmux -S "$sock" kill-server 2>/dev/null
  pkill -9 -f "train.out_dir=$s" 2>/dev/null
  stopped_ok "Ctrl-C in a terminal on cluster/mpirun-local (3 s save)" "$s.log" "$s" SIGUSR1 "$(cat "$s.rc" 2>/dev/null || echo 99)"
else
  echo "skip Ctrl-C terminal test (no tmux)"
fi

# --- 8. A full disk -------------------------------------------------------------------------
fs=$tmp/tmpfs
mkdir -p "$fs"
one=$(du -sk "$saved/step_00000010" | cut -f1)
if mount -t tmpfs -o size=$((one * 3 / 2 + 8))k tmpfs "$fs" 2>/dev/null; then
  mounted=$fs
  train 2 "$tmp/full" -o train.steps=30 --checkpoint-every 10 --keep 0 --checkpoint-dir "$fs/ck"
  rc=$?
  if [ $rc -eq 1 ] && grep -Eq "No space left on device|not enough free space" "$tmp/full.log" &&
    [ "$(cat "$fs/ck/LATEST")" = step_00000010 ] && "$moerun" checkpoint verify "$fs/ck" >/dev/null 2>&1 &&
    [ ! -e "$fs/ck/step_00000020.tmp" ]; then
    ok "disk full: the save of step 20 fails with the OS reason, step 10 intact, exit 1"
  else
    bad "disk full: rc=$rc $(grep moerun "$tmp/full.log" | head -2)"
  fi
  rm -rf "$fs/ck"
  train 2 "$tmp/full2" -o train.steps=30 --checkpoint-every 10 --keep 0 --checkpoint-dir "$fs/ck" \
    -o train.on_checkpoint_error=continue
  grep -q "step 30/30" "$tmp/full2.log" && ok "on_checkpoint_error=continue trains on after a failed save" ||
    bad "continue after a failed save"
  umount "$fs" && mounted=""
else
  echo "skip disk-full test (cannot mount a tmpfs here)"
fi
train 2 "$tmp/devfull" -o train.metrics_path=/dev/full
[ $? -eq 1 ] && grep -q "cannot write metrics file '/dev/full'" "$tmp/devfull.log" &&
  ok "a metrics write error stops the run (exit 1)" || bad "metrics write error: $(tail -2 "$tmp/devfull.log")"

# --- 9. Non-finite loss ---------------------------------------------------------------------
train 2 "$tmp/nan" -o train.learning_rate=1e30 -o train.clip_grad_norm=0 --checkpoint-every 1
rc=$?
nan_step=$(grep -o 'moerun train: step [0-9]*' "$tmp/nan.log" | grep -o '[0-9]*$')
if [ $rc -eq 1 ] && [ -n "$nan_step" ] && grep -q "not finite.*the gradient of '[^']*' is not finite" "$tmp/nan.log" &&
  ! ls "$tmp/nan/checkpoints" 2>/dev/null | grep -q "$(printf 'step_%08d' "$nan_step")"; then
  ok "a non-finite loss stops at step $nan_step (exit 1), naming the first non-finite gradient; no checkpoint of it"
else
  bad "non-finite: rc=$rc $(grep moerun "$tmp/nan.log" | head -2)"
fi

# --- 10. Async, time-based, --keep ----------------------------------------------------------
train 2 "$tmp/async" --async-checkpoint --checkpoint-every 5 --keep 0 &&
  diff <(losses "$tmp/p2-straight/metrics.jsonl") <(losses "$tmp/async/metrics.jsonl") >/dev/null &&
  cmp -s "$tmp/p2-straight/checkpoints/step_00000020/shard-00000-of-00002.safetensors" \
    "$tmp/async/checkpoints/step_00000020/shard-00000-of-00002.safetensors" &&
  [ "$(grep -c '"async":true,.*"event":"checkpoint"' "$tmp/async/metrics.jsonl")" -eq 3 ] &&
  "$moerun" checkpoint verify "$tmp/async/checkpoints/step_00000015" >/dev/null &&
  ok "async saves: same losses and final shards as without, steps 5/10/15 committed in the background" ||
  bad "async: $(tail -n 3 "$tmp/async.log")"
# Enough steps that the run outlasts several 0.12 s intervals however fast the machine is
# (300 steps took under 0.36 s once the kernels got faster).
train 2 "$tmp/timed" -o train.steps=1500 -o train.log_every=500 --checkpoint-every-minutes 0.002 --keep 2
n=$(grep -c '"event":"checkpoint"' "$tmp/timed/metrics.jsonl")
kept=$(ls -d "$tmp"/timed/checkpoints/step_* | wc -l)
[ "$n" -ge 3 ] && [ "$kept" -eq 2 ] && [ "$(cat "$tmp/timed/checkpoints/LATEST")" = step_00001500 ] &&
  ok "time-based saves ($n) with --keep 2 leave the newest 2" || bad "timed: n=$n kept=$kept"

cp -r "$tmp/p2-straight" "$tmp/nolatest" && rm "$tmp/nolatest/checkpoints/LATEST"
train 2 "$tmp/nolatest" && grep -q "has no LATEST file; using step_00000020" "$tmp/nolatest.log" &&
  grep -q '"steps":20,"steps_this_run":0' "$tmp/nolatest.log" &&
  ok "without LATEST, --resume auto takes the newest committed checkpoint" ||
  bad "no LATEST: $(grep -E 'LATEST|moerun' "$tmp/nolatest.log" | head -3)"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
