#!/usr/bin/env bash
# One prepared GPU session (issue #9): correctness on the device, then the layer and peers
# benchmarks, each report written to $OUT (else ./gpu_out). Runs from the repository root with
# the machine's own torch and moesaic from the checkout (PYTHONPATH=.), no network; every step has
# a time limit and the whole stays under 10 minutes. Usage: bash benchmarks/gpu_session.sh
# (DEVICE=cpu QUICK=1 bash benchmarks/gpu_session.sh tries it out on a CPU machine.)
set -uo pipefail
out="${OUT:-gpu_out}"
device="${DEVICE:-cuda}"
quick=()
[ -n "${QUICK:-}" ] && quick=(--quick)
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, its output also in $out/NAME.md
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.md"
  echo "== $name: exit ${PIPESTATUS[0]}"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c \
  'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())'; } \
  2>&1 | tee "$out/machine.txt"
step device_check 120 python3 benchmarks/device_check.py --device "$device"
step moe_layer_bf16 120 python3 benchmarks/moe_layer.py --device "$device" --dtype bfloat16 "${quick[@]}"
step moe_layer_fp32 90 python3 benchmarks/moe_layer.py --device "$device" "${quick[@]}"
step peers_bf16 240 python3 benchmarks/peers.py --device "$device" --dtype bfloat16 "${quick[@]}"
