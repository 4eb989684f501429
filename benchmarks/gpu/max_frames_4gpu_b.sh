#!/usr/bin/env bash
# A 4-GPU machine, second call for issue 8 (max_frames_4gpu.sh's first probe, 4 x 7,680 frames, did not end
# within the call): 4 x 4,096 frames timed (one H200 held 4,096), then one probe at 4 x 6,144 if the
# call's time allows; the JSON is rewritten after each.
set -u
source benchmarks/gpu/_setup.sh
date -u
timeout 575 python3 -m benchmarks.bench_step --devices 4 --frames 4096 --frame_chunk 16 --steps 1 \
  --find_max_frames --max_frames_step 1024 --max_frames_limit 6144 --time_budget_s 555 \
  --out "$OUT/max_frames_d4_b.json" > "$OUT/max_frames_d4_b.log" 2>&1
echo "exit $?"; date -u
grep -v cuda_timer "$OUT/max_frames_d4_b.log" | tail -20
