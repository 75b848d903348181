#!/usr/bin/env bash
# Build kd-runner with CUDA here (no GPU needed) and gather what a GPU run needs into .gpu/
# (git-ignored), for the device tool's `carry: [".gpu"]`. See ../shared/cuda/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${KD_SHARED:-../shared}"
# The toolchain script reads cudarc's sources from cargo's registry to stub the driver, and on a
# fresh machine fails (exit 2, nothing printed) when they are not there yet: fetch them first.
cargo fetch --locked
[ -f "$HOME/.cache/kd-cuda-13.0/env.sh" ] || bash "$SHARED/cuda/setup-toolchain.sh"
# shellcheck disable=SC1091
source "$HOME/.cache/kd-cuda-13.0/env.sh"
cargo build --release -p kd-runner --features cuda,cudnn --target-dir target/cuda
mkdir -p .gpu
xz -9 -T0 -c target/cuda/release/kd-runner > .gpu/kd-runner.xz
cp "$SHARED/cuda/device-env.sh" "$SHARED/bench/torch_ref.py" "$SHARED/data/make-cifar10-bin.py" "$SHARED/data/cifar10-jpeg.tar.gz" .gpu/
cp tools/gpu/device-check.sh tools/gpu/fallbacks.sh tools/gpu/ratio.py tools/gpu/ncu_summary.py tools/gpu/torch_nchw.py .gpu/
du -sh .gpu
