#!/usr/bin/env bash
# Installs every Debian package linmix needs to build, test and benchmark.
# Idempotent: packages already present are skipped by apt-get; safe to run again.
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build pkg-config
  libopenblas-dev libopenblas0 libopenblas0-openmp
  libicu-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libcli11-dev nlohmann-json3-dev
  libhwy-dev libfftw3-dev
  clang libclang-rt-14-dev libomp-14-dev
  fortunes
  python3 python3-numpy python3-torch python3-matplotlib python3-regex python3-scipy
  libtorch-dev pybind11-dev python3-pytest python3-venv python3-pip python3-wheel
  libopenmpi-dev openmpi-bin
  zlib1g-dev dataset-fashion-mnist
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PKGS[@]} packages present"
  exit 0
fi

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
