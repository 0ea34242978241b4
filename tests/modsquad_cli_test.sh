#!/usr/bin/env bash
# Mod-Squad through the CLI (configs/tiny_modsquad.pbtxt, synthetic data): training on 1
# and 2 ranks gives the same per-task results, resume continues the run, per-task figures
# in the final JSON line and metrics.jsonl, the usage report (PNG + CSV) at the end and from
# `moerun usage`, `moerun extract` + `moerun eval` of a single-task model, and bad input.
# usage: modsquad_cli_test.sh <moerun> <source dir> <mpiexec>
set -u
m=$1
src=$2
mpiexec=$3
cfg=$src/configs/tiny_modsquad.pbtxt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
check() {  # check <description> <command...>: the command must succeed
  local what=$1
  shift
  if "$@" >/dev/null 2>&1; then passed=$((passed + 1)); else echo "FAIL: $what"; failed=$((failed + 1)); fi
}
row() {  # row <exit code> <regex> <command...>
  local want=$1 pattern=$2 out rc
  shift 2
  out=$(timeout 120 "$@" 2>&1)
  rc=$?
  if [ "$rc" -ne "$want" ] || ! grep -Eq -- "$pattern" <<<"$out"; then
    echo "FAIL: $* -> rc=$rc (want $want), wanted /$pattern/ in:"
    echo "$out" | head -8
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
}
json() { python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print($2)" "$1"; }

"$m" train "$cfg" -o train.out_dir="$tmp/p1" >"$tmp/p1.json" 2>"$tmp/p1.log"
check "1-rank training" test -s "$tmp/p1.json"
"$mpiexec" --oversubscribe -np 2 "$m" train "$cfg" -o train.out_dir="$tmp/p2" >"$tmp/p2.json" 2>"$tmp/p2.log"
check "2-rank training" test -s "$tmp/p2.json"
check "five tasks in the final line" test "$(json "$tmp/p2.json" "len(d['tasks'])")" = 5
check "the same test results on 1 and 2 ranks" python3 - "$tmp/p1.json" "$tmp/p2.json" <<'PY'
import json, sys
a, b = (json.loads(open(p).read().strip().splitlines()[-1])["tasks"] for p in sys.argv[1:])
for t in a:
    for k in a[t]:
        assert abs(a[t][k] - b[t][k]) <= 1e-4 * max(1, abs(a[t][k])), (t, k, a[t][k], b[t][k])
PY
check "per-task figures in metrics.jsonl" grep -q '"segmentation":{"loss"' "$tmp/p2/metrics.jsonl"
check "progress line names the tasks" grep -q "segmentation mIoU" "$tmp/p2.log"
for f in usage_blocks.0.attn.png usage_blocks.1.mlp.csv task_similarity.png task_similarity.csv; do
  check "usage report $f" test -s "$tmp/p2/usage/$f"
done
check "usage CSV: a header and a row per task" test "$(wc -l <"$tmp/p2/usage/usage_blocks.1.mlp.csv")" = 6
check "PNG signature" bash -c "head -c 8 '$tmp/p2/usage/task_similarity.png' | od -An -tx1 | grep -q '89 50 4e 47'"
# Resume: 10 steps, then the rest, equals 20 steps at once.
"$mpiexec" --oversubscribe -np 2 "$m" train "$cfg" -o train.out_dir="$tmp/r" --until-step 10 >/dev/null 2>&1
"$mpiexec" --oversubscribe -np 2 "$m" train "$cfg" -o train.out_dir="$tmp/r" >"$tmp/r.json" 2>/dev/null
check "resumed run reaches the same results" python3 - "$tmp/p2.json" "$tmp/r.json" <<'PY'
import json, sys
a, b = (json.loads(open(p).read().strip().splitlines()[-1])["tasks"] for p in sys.argv[1:])
for t in a:
    for k in a[t]:
        assert abs(a[t][k] - b[t][k]) <= 1e-6 * max(1, abs(a[t][k])), (t, k, a[t][k], b[t][k])
PY
# moerun usage from the checkpoint.
row 0 '"event":"usage"' "$m" usage --checkpoint "$tmp/p2/checkpoints" --out "$tmp/u"
check "moerun usage wrote the heatmaps" test -s "$tmp/u/usage_blocks.2.attn.png"
# Extraction and evaluation of a single-task model.
row 0 '"event":"extract".*"task":"coarse"' "$m" extract --checkpoint "$tmp/p2/checkpoints" --task coarse --out "$tmp/x"
row 0 '"tasks":\{"coarse"' "$m" eval --config "$tmp/x/config.pbtxt" --model "$tmp/x"
# Under a capacity, an evaluation batch that is not whole routing groups per rank (60 images,
# groups of 8) is cut to whole groups, as in training's evaluations.
row 0 '"tasks":\{"coarse"' "$m" eval --config "$tmp/x/config.pbtxt" --model "$tmp/x" \
  -o model.modsquad.capacity_factor=1.25 -o train.eval_batch=60
"$m" extract --checkpoint "$tmp/p2/checkpoints" --task 3 --out "$tmp/x3" >"$tmp/x3.json" 2>/dev/null
check "extract by task id" test "$(json "$tmp/x3.json" "d['task']")" = segmentation
check "fewer parameters than the full model" test "$(json "$tmp/x3.json" "int(d['parameters'] < d['full_parameters'])")" = 1
# Bad input.
row 2 "unknown task 'colour'; the model's tasks are class, coarse, rotation, segmentation, edges" "$m" extract --checkpoint "$tmp/p2/checkpoints" --task colour --out "$tmp/bad1"
row 2 "task id 5 is out of range: the model has 5 tasks \(0..4" "$m" extract --checkpoint "$tmp/p2/checkpoints" --task 5 --out "$tmp/bad2"
row 2 "--out $tmp/x exists" "$m" extract --checkpoint "$tmp/p2/checkpoints" --task coarse --out "$tmp/x"
"$m" train "$src/configs/tiny_test.pbtxt" -o train.steps=2 -o train.out_dir="$tmp/vmoe" >/dev/null 2>&1
row 2 "holds a V-MoE model \(tiny_test\); extract needs a Mod-Squad checkpoint" "$m" extract --checkpoint "$tmp/vmoe/checkpoints" --task class --out "$tmp/bad3"
row 2 "holds a V-MoE model .*usage needs a Mod-Squad checkpoint" "$m" usage --checkpoint "$tmp/vmoe/checkpoints"
sed 's/name: "coarse"/name: "colour"/' "$cfg" >"$tmp/colour.pbtxt"
row 2 "tasks\[1\].name: unknown task 'colour'; the multi-task Fashion-MNIST tasks are class, coarse" "$m" train "$tmp/colour.pbtxt" -o train.out_dir="$tmp/bad4"
sed 's/name: "edges" kind: REGRESSION/name: "edges" kind: CLASSIFICATION/' "$cfg" >"$tmp/kind.pbtxt"
row 2 "task 'edges' is REGRESSION with 1 output\(s\); the config says CLASSIFICATION with 1" "$m" train "$tmp/kind.pbtxt" -o train.out_dir="$tmp/bad6"
grep -v "tasks {" "$cfg" >"$tmp/notasks.pbtxt"
row 2 "model.modsquad.tasks: needs at least one task" "$m" plan "$tmp/notasks.pbtxt"
row 2 "model.modsquad.attention_k: 5 must be between 1 and attention_experts \(4\)" "$m" plan "$cfg" -o model.modsquad.attention_k=5
row 2 "block 0's MoE attention layer: 3 expert-parallel ranks cannot hold 4 experts" "$mpiexec" --oversubscribe -np 3 "$m" train "$cfg" -o train.out_dir="$tmp/bad5" -o train.global_batch=9
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
