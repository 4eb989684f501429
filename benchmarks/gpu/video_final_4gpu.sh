#!/usr/bin/env bash
# A 4-GPU machine, one call (about 6 minutes), after the mp4 preset and the cuBLAS-GEMM compile options:
# the 1,152-frame video on GPUs 0-1, then the 2,304-frame video on all 4, each with its own empty
# persistent cache (cold compiles); then, if time is left, the 1,152-frame program's warm compile.
set -u
source benchmarks/gpu/_setup.sh
V="python3 -m benchmarks.bench_video --frame_chunk=0"
CUDA_VISIBLE_DEVICES=0,1 timeout 190 $V --frames=1152 --num_devices=2 --compilation_cache_dir=/tmp/c2 \
  --json="$OUT/video1152.json" --output=/tmp/v1152.mp4 > "$OUT/video1152.log" 2>&1
timeout 190 $V --frames=2304 --num_devices=4 --compilation_cache_dir=/tmp/c4 --json="$OUT/video2304.json" \
  --output=/tmp/v2304.mp4 > "$OUT/video2304.log" 2>&1
if [ "$SECONDS" -lt 330 ]; then
  CUDA_VISIBLE_DEVICES=0,1 timeout 55 $V --frames=1152 --num_devices=2 --compilation_cache_dir=/tmp/c2 \
    --compile_only --json="$OUT/video1152_warm.json" --output=/tmp/v1152.mp4 > "$OUT/video1152_warm.log" 2>&1
fi
ls -la /tmp/v1152.mp4 /tmp/v2304.mp4
for f in video1152 video2304 video1152_warm; do echo "== $f"; tail -13 "$OUT/$f.log"; done
