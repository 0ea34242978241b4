#!/usr/bin/env bash
# Packs what the GPU checks (cluster/gpu_checks.sh) need into .gpu/, for a machine that has
# a GPU, CUDA, cuBLAS and NCCL but none of Debian's packages and no network (the device
# machines lent to some sessions: their image has nvcc, CUDA 13 and pip's NCCL, and no
# Open MPI, OpenBLAS, protobuf, glog or Boost). Run here after `bash cluster/setup.sh` (the
# packages); it builds build-gpu/ for sm_90 and any x86-64-v3 CPU (-DMOERUN_NATIVE_ARCH=OFF:
# the device machine's CPU may lack this one's AVX-512), a few minutes on 2 cores. Then
# carry `.gpu` to the machine and run `bash cluster/gpu_checks.sh` there.
#
# .gpu/moerun-gpu.tar.xz (about 48 MiB, under the 64 MiB a device call carries) holds .gpu/:
# bin/ (moerun and the CUDA test programs), lib/ (every shared library they load that is
# neither glibc's nor CUDA's), ompi/ (Open MPI's plugins, help files and orted, found through
# OPAL_* variables), configs/, data/ (Fashion-MNIST's files), launch/moe_layer_torch.py and
# cases/ (the small replay cases). Checked here (as root) by running `moerun env` and the CUDA
# test programs in a chroot holding only glibc, CUDA's libraries and the bundle.
# Usage: bash cluster/gpu_bundle.sh [build dir]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-gpu}
if [ "$build" = build-gpu ]; then
  # x86-64-v3 (AVX2, FMA): every CPU an H100 or H200 is installed with has it; not AVX-512,
  # which some (AMD's before Zen 4) lack. The host's share of a device job (the gates'
  # softmax and noise, the routing plan, the replay's CPU side) then runs vectorised.
  cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DMOERUN_NATIVE_ARCH=OFF \
    -DCMAKE_CXX_FLAGS=-march=x86-64-v3 -DCMAKE_CUDA_ARCHITECTURES=90 >build-gpu.log 2>&1 ||
    { tail -n 30 build-gpu.log; echo "gpu_bundle: configure failed" >&2; exit 1; }
  cmake --build build-gpu -j"$(nproc)" --target moerun cuda_backend_tests device_ops_cuda_tests \
    >>build-gpu.log 2>&1 || { tail -n 30 build-gpu.log; echo "gpu_bundle: build failed" >&2; exit 1; }
fi
stage=$(mktemp -d)
out=$stage/.gpu
bins=(moerun tests/cuda_backend_tests tests/device_ops_cuda_tests)
for b in "${bins[@]}"; do
  [ -x "$build/$b" ] || {
    echo "gpu_bundle: $build/$b is missing: build with CUDA first (bash cluster/setup.sh)" >&2
    exit 1
  }
done
grep -q "MOERUN_WITH_CUDA:BOOL=ON\|MOERUN_WITH_CUDA=1" "$build/CMakeCache.txt" \
  "$build/runtime/CMakeFiles/moerun_runtime.dir/flags.make" 2>/dev/null || {
  echo "gpu_bundle: $build was configured without CUDA" >&2
  exit 1
}
mkdir -p "$out/bin" "$out/lib" "$out/ompi/lib" "$out/ompi/share" "$out/ompi/bin"
for b in "${bins[@]}"; do cp "$build/$b" "$out/bin/"; done
strip --strip-unneeded "$out"/bin/*

# Open MPI as installed: its plugins (dlopen'ed from OPAL_PREFIX/lib/openmpi3), help texts
# and orted (a singleton MPI_Init may start one).
pkglib=$(ompi_info --path pkglibdir --parsable | sed 's/.*://')
pkgdata=$(ompi_info --path pkgdatadir --parsable | sed 's/.*://')
cp -r "$pkglib" "$out/ompi/lib/openmpi3"
cp -r "$pkgdata" "$out/ompi/share/openmpi"
cp "$(command -v orted)" "$out/ompi/bin/" 2>/dev/null || true
cp -r /etc/openmpi "$out/ompi/etc" 2>/dev/null || true

# Shared libraries: of the programs and of the plugins, leaving out glibc's (the machine's
# own, newer) and CUDA's (the machine's toolkit and NCCL). Plugins whose libraries are
# missing here are left for Open MPI to skip.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libmvec|libpthread|libdl\.so|librt\.so|libresolv|libcuda\.so|libcudart|libcublas|libnccl|libnvidia)'
{
  for f in "$out"/bin/* "$out"/ompi/bin/* "$out"/ompi/lib/openmpi3/*.so; do
    [ -f "$f" ] && ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
  done
} | sort -u | while read -r name path; do
  [[ "$name" =~ $skip ]] && continue
  cp -L "$path" "$out/lib/$name"
done
strip --strip-unneeded "$out"/lib/*.so* 2>/dev/null || true
mkdir -p "$out/configs" "$out/data" "$out/launch" && cp configs/*.pbtxt "$out/configs/"
cp launch/moe_layer_torch.py "$out/launch/"  # bench moe-layer --device cuda's PyTorch peer
data=/usr/share/datasets/fashion-mnist
if [ -d "$data" ]; then
  cp "$data"/*.gz "$out/data/"
else
  echo "gpu_bundle: no $data (apt-get install dataset-fashion-mnist): the train checks will fail" >&2
fi
# The replay cases (tests/reference/replay_devices.sh, V-MoE's and Mod-Squad's), made here where the safetensors
# package is; the large ones are left for the device (numpy alone writes them there), being
# 19 MB each of incompressible floats. The CPU side is checked against the reference here.
if python3 -c "import numpy, safetensors" 2>/dev/null; then
  mkdir -p "$out/cases"
  bash tests/reference/replay_devices.sh "$build/moerun" python3 "$out/cases" cpu >"$stage/replay.log" 2>&1 ||
    { cat "$stage/replay.log"; echo "gpu_bundle: the CPU replay failed" >&2; exit 1; }
  REPLAY_KIND=modsquad bash tests/reference/replay_devices.sh "$build/moerun" python3 "$out/cases" \
    cpu >"$stage/replay.log" 2>&1 ||
    { cat "$stage/replay.log"; echo "gpu_bundle: the CPU Mod-Squad replay failed" >&2; exit 1; }
  rm -f "$out"/cases/large_*.safetensors
else
  echo "gpu_bundle: no numpy/safetensors here (bash cluster/setup.sh): the device makes the cases" >&2
fi
# The commit packed (and whether the tree had changes): gpu_checks.sh compares it with the
# tree it runs in.
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!.gpu' || echo ' (with uncommitted changes)')" \
  >"$out/REVISION"
# Self-check (root, where chroot and a proc mount are allowed): the bundle alone, with only
# glibc and CUDA's libraries beside it (no Debian package), runs `moerun env` and the two CUDA
# test programs (which skip without a GPU) in a chroot, with the environment gpu_checks.sh
# sets: a library the bundle lacks fails here, not on the device machine.
if [ "$(id -u)" -eq 0 ] && command -v chroot >/dev/null; then
  chk=$(mktemp -d)
  mkdir -p "$chk/lib64" "$chk/lib/x86_64-linux-gnu" "$chk/cuda" "$chk/tmp" "$chk/proc" "$chk/dev"
  cp -a "$out" "$chk/.gpu"
  ldd "$out/bin/moerun" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
    case "$name" in
      libcuda.so* | libcudart* | libcublas* | libnccl* | libnvidia*) cp -L "$path" "$chk/cuda/" ;;
      libc.so* | libm.so* | libmvec* | libpthread* | libdl.so* | librt.so* | libresolv*)
        cp -L "$path" "$chk/lib/x86_64-linux-gnu/" ;;
    esac
  done
  cp -L /lib64/ld-linux-x86-64.so.2 "$chk/lib64/"
  mounted=()
  mount -t proc proc "$chk/proc" 2>/dev/null && mounted+=("$chk/proc")
  touch "$chk/dev/null" && mount --bind /dev/null "$chk/dev/null" 2>/dev/null &&
    mounted+=("$chk/dev/null")
  g=/.gpu
  in_chroot() {
    timeout 120 env -i OPAL_PREFIX=$g/ompi OPAL_PKGLIBDIR=$g/ompi/lib/openmpi3 \
      OPAL_PKGDATADIR=$g/ompi/share/openmpi OPAL_SYSCONFDIR=$g/ompi/etc OPAL_BINDIR=$g/ompi/bin \
      OMPI_MCA_ess_singleton_isolated=1 LD_LIBRARY_PATH=$g/lib:/cuda GLOG_logtostderr=1 \
      HOME=/tmp TMPDIR=/tmp "$(command -v chroot)" "$chk" "$@"
  }
  ok=1
  for prog in "moerun env" tests_backend tests_ops; do
    case "$prog" in
      tests_backend) cmd=("$g/bin/cuda_backend_tests") ;;
      tests_ops) cmd=("$g/bin/device_ops_cuda_tests") ;;
      *) cmd=("$g/bin/moerun" env) ;;
    esac
    if ! in_chroot "${cmd[@]}" >"$stage/chroot.log" 2>&1; then
      tail -n 20 "$stage/chroot.log"
      echo "gpu_bundle: ${cmd[*]} fails in a chroot of the bundle alone (above)" >&2
      ok=0
    fi
  done
  for m in "${mounted[@]}"; do umount "$m"; done
  rm -rf "$chk"
  [ $ok -eq 1 ] || { rm -rf "$stage"; exit 1; }
  echo "gpu_bundle: checked: moerun env and the CUDA test programs run from the bundle alone (chroot)"
else
  echo "gpu_bundle: not root (or no chroot): the chroot self-check is skipped"
fi
mkdir -p .gpu
tar -C "$stage" -cJf .gpu/moerun-gpu.tar.xz .gpu
rm -rf "$stage"
echo "gpu_bundle: .gpu/moerun-gpu.tar.xz is $(du -m .gpu/moerun-gpu.tar.xz | cut -f1) MiB;" \
  "on the device machine: bash cluster/gpu_checks.sh, carrying \".gpu\""
