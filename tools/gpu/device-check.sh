#!/usr/bin/env bash
# On the GPU machine (run from the checkout with .gpu/ carried): kd's bench and PyTorch's
# reference throughput on the same card in one call, then a short training run on the CIFAR-10
# copy. Logs go to $OUT. Usage: bash .gpu/device-check.sh [EPOCHS=2]
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
xz -dc .gpu/kd-runner.xz > /tmp/kd-runner && chmod +x /tmp/kd-runner
# shellcheck disable=SC1091
source .gpu/device-env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 .gpu/make-cifar10-bin.py /tmp/c10 --src .gpu/cifar10-jpeg.tar.gz > "$OUT/data.txt" 2>&1
/tmp/kd-runner bench --device cuda --batch 256 --stem cifar --steps 20 --warmup 3 2>&1 | tee "$OUT/kd-bench.txt"
python3 .gpu/torch_ref.py throughput --no-maxpool --batch 256 2>&1 | tee "$OUT/torch-bench.txt"
mkdir -p /tmp/kdd && ln -sfn /tmp/c10 /tmp/kdd/cifar10
/tmp/kd-runner train --device cuda --data-dir /tmp/kdd --dataset cifar10 --stem cifar --batch-size 512 \
  --epochs "${1:-2}" --lr 0.4 --warmup-epochs 1 --run-dir "$OUT/r18" 2>&1 | tail -5 | tee "$OUT/train.txt"
