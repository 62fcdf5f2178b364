#!/usr/bin/env bash
# The CPU kernels' tests on an emulated aarch64 CPU (qemu user mode), from an x86_64 Linux host.
#
# moesaic chooses every oneDNN, bf16, packing, int8 and threading path by probing the running
# CPU and torch build (moesaic/kernels/cpu/capability.py); this runs the tests of those choices
# where torch is an ARM build (oneDNN with the Arm Compute Library, no fbgemm, a renamed
# libgomp). Emulation says nothing about speed, and qemu reports its own CPU features.
#
# Needs root (binfmt_misc, chroot), Debian's qemu-user-static and debootstrap, and network access
# to PyPI and Debian. torch 2.13 on PyPI is a CUDA build for aarch64; the newest CPU-only aarch64
# wheel there is 2.9.1, so this runs on 2.9.1. About 10 minutes of setup, then the tests.
#
#   sudo bash benchmarks/portability/aarch64_qemu.sh [pytest args...]
set -euo pipefail
ROOT=${AARCH64_ROOT:-/tmp/moesaic-aarch64}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(tests/unit/kernels tests/unit/experts tests/unit/inference tests/unit/test_layer.py)

command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null ||
  apt-get install -y -q qemu-user-static debootstrap
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] ||
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

if [ ! -x "$ROOT/venv/bin/python" ]; then
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,libpython3.11 \
    bookworm "$ROOT" http://deb.debian.org/debian
  mkdir -p "$ROOT/wheels"
  platform=(--only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --abi cp311)
  python3 -m pip download -q -d "$ROOT/wheels" "${platform[@]}" --no-deps torch==2.9.1
  python3 -m pip download -q -d "$ROOT/wheels" "${platform[@]}" numpy safetensors tqdm pytest hypothesis \
    filelock typing-extensions sympy networkx jinja2 fsspec markupsafe mpmath
  chroot "$ROOT" /usr/bin/python3 -m venv /venv
  chroot "$ROOT" /venv/bin/pip install -q --no-index --find-links /wheels torch==2.9.1 numpy \
    safetensors tqdm pytest hypothesis
fi
for fs in proc sys dev; do
  mountpoint -q "$ROOT/$fs" || mount --bind "/$fs" "$ROOT/$fs"
done
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
(cd "$REPO" && git ls-files -c -o --exclude-standard | tar -cf - -T - | tar -xf - -C "$ROOT/src")
chroot "$ROOT" /bin/sh -c "cd /src && PYTHONPATH=/src /venv/bin/python -c \
  'from moesaic.kernels.cpu import cpu_capability; print(cpu_capability().describe())' &&
  PYTHONPATH=/src /venv/bin/python -m pytest -p no:cacheprovider -q ${TESTS[*]}"
