#!/usr/bin/env bash
# Installs every Debian package moerun needs (only the missing ones), then configures and
# builds moerun into build/. Idempotent: a second run installs nothing and rebuilds only
# what changed. Usage: bash cluster/setup.sh [extra cmake -D options]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake git            # toolchain
  libopenmpi-dev openmpi-bin           # MPI
  libprotobuf-dev protobuf-compiler    # configs, manifests
  libboost-program-options-dev         # CLI
  libgoogle-glog-dev libgtest-dev      # logging, tests
  libopenblas-dev libopenblas0-openmp  # CPU GEMM (the OpenMP build is linked)
  zlib1g-dev                           # gzip
  nlohmann-json3-dev                   # JSON lines, safetensors headers
  libcairo2-dev pkg-config fonts-dejavu-core  # Mod-Squad usage heatmaps (PNG)
  librandom123-dev                     # counter-based RNG (router noise)
  clang-format                         # style check in CI
  dataset-fashion-mnist                # the demo dataset
  slurm-wlm munge                      # Slurm (tests/slurm_test.sh starts a local cluster)
  tmux                                 # a terminal for the Ctrl-C test (tests/checkpoint_test.sh)
  python3-pip                          # for the Python test references below
  python3-matplotlib                   # moerun sweep plots (launch/sweep_plots.py)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
else
  echo "setup: all ${#packages[@]} packages present"
fi

# Python packages for tests/safetensors_interop.py and the NumPy MoE reference in
# tests/reference/ (those tests are skipped without them). Only when missing; a failure is
# a warning, not a failed setup.
py_packages=(safetensors numpy)
if ! python3 -c "import safetensors, numpy" >/dev/null 2>&1; then
  echo "setup: installing Python packages ${py_packages[*]} (pip)"
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  # Debian's own python3 refuses pip installs outside a venv (PEP 668) unless told to.
  if ! python3 -m pip install --quiet "${py_packages[@]}" >/dev/null 2>&1 &&
    ! PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet "${py_packages[@]}"; then
    echo "setup: warning: could not pip-install ${py_packages[*]};" \
      "the safetensors_interop and moe_replay_reference tests will be skipped" >&2
  fi
fi

echo "setup: building moerun in build/ (log: build/build.log)"
mkdir -p build
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >build/build.log 2>&1 ||
  { tail -n 40 build/build.log; echo "setup: cmake configure failed"; exit 1; }
cmake --build build -j"$(nproc)" >>build/build.log 2>&1 ||
  { grep -E -A5 "error" build/build.log | head -n 60; echo "setup: build failed"; exit 1; }
echo "setup: done; the CLI is build/moerun"
