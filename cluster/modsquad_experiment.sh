#!/usr/bin/env bash
# Mod-Squad vs the same model without the MI loss vs the dense multi-task ViT of the same
# width, on multi-task Fashion-MNIST (configs/modsquad_fashion_mnist.pbtxt), then every
# task's extracted single-task model. Prints a Markdown table of per-task test metrics,
# usage sharpness (mean per-task usage entropy, bits) and the extracted models' metrics and
# sizes; everything it ran is under OUT (default runs/modsquad_experiment).
# Usage: bash cluster/modsquad_experiment.sh [OUT] [extra moerun train args, e.g. -o train.steps=500]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/modsquad_experiment}
shift || true
moerun=build/moerun
config=configs/modsquad_fashion_mnist.pbtxt
mkdir -p "$out"
declare -A variant_args=(
  [modsquad]=""
  [no_mi]="-o model.modsquad.mi_weight=0"
  [dense]="-o model.modsquad.moe=false"
)
for v in modsquad no_mi dense; do
  if [ ! -s "$out/$v.final.json" ]; then
    echo "== training $v"
    # shellcheck disable=SC2086
    cluster/mpirun-local -np 2 "$moerun" train "$config" -o train.out_dir="$out/$v" \
      -o train.eval_every=0 ${variant_args[$v]} "$@" 2>"$out/$v.log" | tail -n 1 >"$out/$v.final.json"
  fi
done
tasks=$(python3 -c "import json;print(' '.join(json.load(open('$out/modsquad.final.json'))['tasks']))")
for v in modsquad no_mi; do
  for t in $tasks; do
    d="$out/$v.extract.$t"
    if [ ! -s "$d.eval.json" ]; then
      rm -rf "$d"
      "$moerun" extract --checkpoint "$out/$v/checkpoints" --task "$t" --out "$d" >"$d.json" 2>/dev/null
      cluster/mpirun-local -np 1 "$moerun" eval --config "$d/config.pbtxt" --model "$d" \
        2>/dev/null | tail -n 1 >"$d.eval.json"
    fi
  done
done
python3 - "$out" $tasks <<'PY'
import json, sys
out, tasks = sys.argv[1], sys.argv[2:]
def load(p):
    with open(p) as f:
        return json.loads(f.read().strip().splitlines()[-1])
def metric(d):
    (k, v), = [(k, v) for k, v in d.items() if k != "loss"]
    return k, v
rows = {v: load(f"{out}/{v}.final.json") for v in ("modsquad", "no_mi", "dense")}
print("| task | metric | Mod-Squad (MI) | no MI loss | dense multi-task ViT |")
print("|---|---|---|---|---|")
for t in tasks:
    k, _ = metric(rows["modsquad"]["tasks"][t])
    vals = [metric(rows[v]["tasks"][t])[1] for v in ("modsquad", "no_mi", "dense")]
    print(f"| {t} | {k} | " + " | ".join(f"{x:.4f}" for x in vals) + " |")
print("| usage entropy (bits, mean per task and layer) | | " +
      " | ".join(f"{rows[v].get('usage_entropy_bits', float('nan')):.3f}" for v in ("modsquad", "no_mi")) +
      " | - |")
print("| parameters | | " + " | ".join(str(load(f"{out}/{v}.extract.{tasks[0]}.json")["full_parameters"])
                             for v in ("modsquad", "no_mi")) + " | |")
print()
print("| task | variant | full model | extracted | difference | parameters (extracted / full) |")
print("|---|---|---|---|---|---|")
for v in ("modsquad", "no_mi"):
    for t in tasks:
        k, full = metric(rows[v]["tasks"][t])
        ex = load(f"{out}/{v}.extract.{t}.json")
        ev = load(f"{out}/{v}.extract.{t}.eval.json")
        _, got = metric(ev["tasks"][t])
        diff = got - full
        rel = f" ({100 * diff / full:+.2f}%)" if k == "l1" else f" ({100 * diff:+.2f} pts)"
        print(f"| {t} | {v} | {full:.4f} | {got:.4f} | {diff:+.4f}{rel} | "
              f"{ex['parameters']} / {ex['full_parameters']} ({100 * ex['fraction']:.1f}%) |")
PY
