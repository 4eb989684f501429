#!/usr/bin/env bash
# A 4-GPU machine, one call (about 9 minutes): side by side, the 1,152-frame video on GPUs 0-1 (cold
# compile, then the warm compile from the persistent cache in a second process) and the largest frame count
# one GPU holds (GPU 2, frame_chunk 16); then the 2,304-frame video on all 4 GPUs. Results under $OUT.
set -u
source benchmarks/gpu/_setup.sh
V="python3 -m benchmarks.bench_video --frame_chunk=0 --compilation_cache_dir=/tmp/vcache"
CUDA_VISIBLE_DEVICES=2 timeout 330 python3 -m benchmarks.bench_step --devices 1 --frames 256,1152 --frame_chunk 16 \
  --steps 1 --find_max_frames --max_frames_step 256 --time_budget_s 315 --out "$OUT/max_frames.json" \
  > "$OUT/max_frames.log" 2>&1 &
{
  CUDA_VISIBLE_DEVICES=0,1 timeout 250 $V --frames=1152 --num_devices=2 --json="$OUT/video1152.json" \
    --output=/tmp/v1152.mp4 > "$OUT/video1152.log" 2>&1
  CUDA_VISIBLE_DEVICES=0,1 timeout 80 $V --frames=1152 --num_devices=2 --compile_only \
    --json="$OUT/video1152_warm.json" --output=/tmp/v1152.mp4 > "$OUT/video1152_warm.log" 2>&1
} &
wait
timeout 240 $V --frames=2304 --num_devices=4 --json="$OUT/video2304.json" --output=/tmp/v2304.mp4 \
  > "$OUT/video2304.log" 2>&1
ls -la /tmp/v1152.mp4 /tmp/v2304.mp4 >> "$OUT/video2304.log" 2>&1
for f in max_frames video1152 video1152_warm video2304; do echo "== $f"; tail -14 "$OUT/$f.log"; done
