#!/usr/bin/env bash
# Kill-anywhere harness, longer than CI's: N SIGKILLs at pseudo-random moments of a tiny training
# run (checkpoint writes slowed so that many land mid-write), each resumed and compared bit for
# bit with an uninterrupted run. Usage: tools/kill_anywhere.sh [N=25] [SEED=7] [DELAY_MS=500]
set -euo pipefail
cd "$(dirname "$0")/.."
KD_KILL_POINTS="${1:-25}" KD_KILL_SEED="${2:-7}" KD_KILL_DELAY_MS="${3:-500}" \
  cargo test --release -p kd-runner --test kill_anywhere -- --nocapture
