#!/usr/bin/env bash
# Issue 24, the whole videos with the window kernel on (the default since d34d1ee), one H100 or H200, one call
# of about 8 min: 1,152 frames at 320x512 on one GPU, text to a written mp4, random full-size weights drawn
# once, one process: T2V-Turbo 4 steps (the defaults: frame_chunk auto), then 30 guided DPM++ SDE steps with
# --frame_chunk 64 and with auto (0 by the plan), to see which chunking is faster for the guided video.
#   carry: .whl (ftfy, imageio-ffmpeg)
set -u
source benchmarks/gpu/_setup.sh
W=/tmp/w; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt
timeout 565 python3 -m benchmarks.bench_video --runs=turbo:4,dpmpp_sde:30:chunk=64,dpmpp_sde:30 --frames=1152 \
  --num_devices=1 --output=/tmp/v1152.mp4 --json=$W/video_kernel.json > $W/video_kernel.log 2>&1
echo "exit status $?" >> $W/video_kernel.log; ls -la /tmp/v1152.mp4 >> $W/video_kernel.log 2>&1; pack
echo "== elapsed $SECONDS s"; cat $W/gpu.txt; grep -v "^[IW][0-9]\{4\}" $W/video_kernel.log | grep -v "^step " | tail -45
