#!/usr/bin/env bash
# Issue 26 (one GPU, one call): a ZeroScope-shaped model (the zeroscope_576w preset: VideoCrafter2's UNet3D without
# fps conditioning, a 23-layer CLIP text tower, the pipeline's DDIM-trained schedule; random weights, drawn once)
# makes 1,152 frames at 320x576 on one GPU with configs/zeroscope_576w_long.flags' settings (DPM-Solver++ SDE 30
# steps, guidance 12, dual-scope attention P=8, G=16), decoded and written; the memory plan first (--dry_run).
# Results: $OUT/all.tgz holds zeroscope.json (the sidecar: settings, timings, memory), the logs and gpu.txt.
set -u
source benchmarks/gpu/_setup.sh
W=/tmp/w; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt
ARGS=(--flagfile configs/zeroscope_576w_long.flags --weights= --model=zeroscope_576w --num_devices=1
  --output=$W/zeroscope.mp4 --compilation_cache_dir=)
timeout 60 python3 -m vinf_jax.sample "${ARGS[@]}" --dry_run > $W/dry_run.log 2>&1; pack
timeout 500 python3 -m vinf_jax.sample "${ARGS[@]}" > $W/zeroscope.log 2>&1
echo "exit status $?" >> $W/zeroscope.log
ls -la $W/zeroscope.mp4 >> $W/zeroscope.log 2>&1; rm -f $W/zeroscope.mp4; pack  # the video of random weights is noise: only its sidecar comes back
echo "== elapsed $SECONDS s"; cat $W/gpu.txt; tail -4 $W/dry_run.log; grep -v "^step " $W/zeroscope.log | tail -8
