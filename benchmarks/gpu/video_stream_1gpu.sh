#!/usr/bin/env bash
# Issue 24 (one H100 or H200, one call): 1,152 frames at 320x512 on one GPU, text to a written mp4, with the
# defaults (frame_chunk/decode_chunk auto): T2V-Turbo 4 steps with the decode handed to the mp4 writer piece by
# piece (streamed), the same run decoding every frame before writing (sequential: decode and write alone), and
# the 30-step guided run (DPM++ SDE); random full-size weights drawn once.   carry: .whl (ftfy)
set -u
source benchmarks/gpu/_setup.sh
W=/tmp/w; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt
timeout 560 python3 -m benchmarks.bench_video --runs=turbo:4,turbo:4:sequential,turbo:4,dpmpp_sde:30 --frames=1152 \
  --num_devices=1 --output=/tmp/v1152.mp4 --json=$W/video_stream.json > $W/video_stream.log 2>&1
echo "exit status $?" >> $W/video_stream.log; ls -la /tmp/v1152.mp4 >> $W/video_stream.log 2>&1; pack
echo "== elapsed $SECONDS s"; cat $W/gpu.txt; grep -v "^[IW][0-9]\{4\}" $W/video_stream.log | grep -v "^step " | tail -40
