#!/usr/bin/env bash
# A 4-GPU machine, one call (under 10 minutes): the largest frame count 4 GPUs hold in one pass (issue 8).
# Two sizes on all 4 GPUs give XLA's memory per frame, whose fill of a card is the first probe; each probe
# is a compile and one step of 4 x F frames (--frame_chunk 16, the memory mode), 256 frames per GPU apart.
# The JSON is rewritten after every probe, so a cut-off call keeps what it found.
set -u
source benchmarks/gpu/_setup.sh
timeout 575 python3 -m benchmarks.bench_step --devices 4 --frames 256,1024 --frame_chunk 16 --steps 1 \
  --find_max_frames --max_frames_step 256 --max_frames_limit 16384 --time_budget_s 560 \
  --out "$OUT/max_frames_d4.json" > "$OUT/max_frames_d4.log" 2>&1
echo "exit $?"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
tail -25 "$OUT/max_frames_d4.log"
