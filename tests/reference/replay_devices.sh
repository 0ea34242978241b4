#!/usr/bin/env bash
# One MoE layer replayed on each of several backends (`moerun replay-moe --device D`, one
# rank), each result checked against the NumPy float64 reference (check_result.py), and
# every backend's result compared with the first's (compare_results.py). With
# REPLAY_KIND=modsquad the same for Mod-Squad's layers (`moerun replay-modsquad`, its cases
# from make_modsquad_case.py, checked by check_modsquad_result.py; needs the safetensors
# package too).
#
# usage: [REPLAY_KIND=moe|modsquad] replay_devices.sh <moerun> <python3> <case_dir> <device>...
#   replay_devices.sh build/moerun python3 /tmp/cases cpu cuda   (the GPU checks)
#   replay_devices.sh build/moerun python3 /tmp/cases cpu cpu    (CI: the harness, and the
#                                                                  CPU run against itself)
# Cases missing from case_dir are made with make_case.py (numpy; the safetensors package
# where installed); each case's file name carries a hash of its arguments and of the
# generator, so a changed case is made anew. A backend's result is compared with the first
# backend's to 1e-4 of each tensor's scale, and with the same backend's (run twice) exactly.
# The small cases check every gradient against finite differences; the large ones (the
# expert GEMMs at sizes where a device's kernels take their tiled paths) check the forward
# against the reference and the gradients between backends.
# Exit 0 all ok, 1 any failure, 77 numpy missing.
set -u
moerun=$1
python=$2
cases=$3
shift 3
devices=("$@")
[ ${#devices[@]} -ge 1 ] || { echo "usage: $0 <moerun> <python3> <case_dir> <device>..." >&2; exit 2; }
ref=$(cd "$(dirname "$0")" && pwd)
kind=${REPLAY_KIND:-moe}
case $kind in
  moe) make=make_case.py check=check_result.py command=replay-moe needs="numpy" ;;
  modsquad)
    make=make_modsquad_case.py check=check_modsquad_result.py command=replay-modsquad
    needs="numpy, safetensors"
    ;;
  *) echo "REPLAY_KIND=$kind: use moe or modsquad" >&2; exit 2 ;;
esac
"$python" -c "import $needs" 2>/dev/null || { echo "skipped: $python lacks $needs"; exit 77; }
mkdir -p "$cases"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
passed=0
failed=0
fail() { echo "FAIL $*"; failed=$((failed + 1)); }

# replay NAME CHECK_ARGS -- MAKE_CASE_ARGS...
replay() {
  local name=$1 check_args=$2
  shift 3
  local hash
  # The arguments and the generator itself: a changed generator makes its cases anew.
  hash=$({ printf '%s ' "$@"; cksum <"$ref/$make"; } | cksum | cut -d ' ' -f 1)
  local case=$cases/$name.$hash.safetensors first="" first_dev="" dev log
  if [ ! -f "$case" ]; then
    # Written aside, then moved: an interrupted run leaves no half case behind.
    "$python" "$ref/$make" --quiet --out "$case.part" "$@" >/dev/null &&
      mv "$case.part" "$case" ||
      { fail "$name: $make could not make the case"; return; }
  fi
  local i=0
  for dev in "${devices[@]}"; do
    i=$((i + 1))
    local res=$out/$name.$i.$dev.safetensors t0=$SECONDS
    # Each run under its own limit: one that hangs (a device that never answers) fails alone.
    # --foreground: in the caller's process group, so a timeout around this script (the GPU
    # checks' step) reaches it too.
    if ! log=$(timeout --foreground -k 5 "${REPLAY_TIMEOUT_S:-90}" "$moerun" "$command" \
      --case "$case" --out "$res" --device "$dev" 2>&1); then
      fail "$name on $dev: $command failed:"; echo "$log" | tail -5
      continue
    fi
    # shellcheck disable=SC2086  # check_args: zero or more flags
    if log=$("$python" "$ref/$check" --case "$case" --result "$res" $check_args 2>&1); then
      passed=$((passed + 1))
      echo "ok   $name on $dev ($((SECONDS - t0)) s): $(tail -n 1 <<<"$log")"
    else
      fail "$name on $dev against the reference:"; echo "$log"
    fi
    local tol=1e-4
    [ "$dev" != "$first_dev" ] || tol=0  # the same backend twice: the same bits
    if [ -z "$first" ]; then
      first=$res first_dev=$dev
    elif log=$("$python" "$ref/compare_results.py" --a "$first" --b "$res" --tol "$tol" 2>&1); then
      passed=$((passed + 1))
      echo "ok   $name: $first_dev vs $dev: $(tail -n 1 <<<"$log")"
      [ "$dev" = "$first_dev" ] || grep -E '^ok   (y|grad\.)' <<<"$log" | sed 's/^/       /'
    else
      fail "$name: $first_dev vs $dev:"; echo "$log"
    fi
  done
}

if [ "$kind" = modsquad ]; then
  # The MoE MLP and the MoE attention: dropless (routing on the device), with the case's
  # noise and an initial usage EMA (routing on the host), and at a capacity (BPR, vanilla).
  replay ms_mlp_dropless "" -- --seed 1 --layer mlp --batch 4
  replay ms_attention_dropless "" -- --seed 2 --layer attention --batch 4
  replay ms_mlp_noise_usage "" -- --seed 3 --layer mlp --tasks 4 --passes 3 --pass-tasks 0,2,2 \
    --with-noise --with-usage
  replay ms_attention_noise_usage "" -- --seed 4 --layer attention --tasks 4 --passes 3 \
    --pass-tasks 3,0,3 --with-noise --with-usage
  replay ms_mlp_capacity_bpr "" -- --seed 5 --layer mlp --batch 4 --capacity-factor 0.5 \
    --multiple-of 0 --group-size 3
  replay ms_attention_capacity_vanilla "" -- --seed 6 --layer attention --batch 4 --capacity 1 \
    --bpr 0 --group-size 3
  echo "$passed passed, $failed failed (devices: ${devices[*]}; replay-$kind)"
  [ "$failed" -eq 0 ]
  exit
fi
small=(--d 8 --m 16 --importance-weight 0.01 --load-weight 0.01 --gshard-weight 0.01)
replay bpr_noise_drops "" -- --seed 3 --tokens 16 --experts 4 --k 2 --capacity-factor 0.75 \
  --multiple-of 0 --bpr 1 --group-size 4 --noise-std 1.0 --with-noise "${small[@]}"
replay vanilla_drops_e8 "" -- --seed 5 --tokens 32 --experts 8 --k 2 --capacity-factor 0.5 \
  --multiple-of 0 --bpr 0 --group-size 4 "${small[@]}"
replay k1_capacity1 "" -- --seed 7 --tokens 16 --experts 4 --k 1 --capacity 1 --bpr 1 \
  --group-size 4 "${small[@]}"
replay dropless "" -- --seed 13 --tokens 16 --experts 4 --k 2 --capacity-factor 0 --bpr 0 \
  --group-size 4 "${small[@]}"
# V-MoE-like widths (D 256, M 1024; E 8, K 2), fixed capacity with BPR and drops, and
# dropless (the device's grouped GEMM path).
large=(--tokens 1024 --d 256 --m 1024 --experts 8 --k 2 --group-size 256)
replay large_bpr_noise --no-grads -- --seed 21 "${large[@]}" --capacity-factor 1.05 --bpr 1 \
  --noise-std 1.0 --with-noise
replay large_dropless --no-grads -- --seed 23 "${large[@]}" --capacity-factor 0 --bpr 0
echo "$passed passed, $failed failed (devices: ${devices[*]}; replay-$kind)"
[ "$failed" -eq 0 ]
