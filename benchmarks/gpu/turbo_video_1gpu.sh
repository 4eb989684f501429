#!/usr/bin/env bash
# Issue 15 (one H200, one call): 1,152 frames at 320x512 on one GPU, decoded and written, with T2V-Turbo's
# sampler at 4 and 8 steps next to the paper's 30-step guided run, one process (random weights drawn once), the
# memory mode (--frame_chunk 16); then the PyTorch eager baseline at F=64 on the same GPU if time is left.
#   carry: .whl (diffusers for the baseline)
set -u
source benchmarks/gpu/_setup.sh
W=/tmp/w; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt
timeout 320 python3 -m benchmarks.bench_video --runs=turbo:4,turbo:8,dpmpp_sde:30 --frames=1152 --num_devices=1 \
  --frame_chunk=16 --decode_chunk=8 --output=/tmp/v1152.mp4 --json=$W/video_turbo.json > $W/video_turbo.log 2>&1
ls -la /tmp/v1152.mp4 >> $W/video_turbo.log 2>&1; pack
if [ "$SECONDS" -lt 285 ]; then
  timeout 45 python3 benchmarks/torch_unet3d_baseline.py float16 64 > $W/torch_eager.log 2>&1; pack
fi
echo "== elapsed $SECONDS s"; grep -v "^[IW]1202" $W/video_turbo.log | tail -12; tail -3 $W/torch_eager.log 2>/dev/null
