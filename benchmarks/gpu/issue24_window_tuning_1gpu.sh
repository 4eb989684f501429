#!/usr/bin/env bash
# Issue 24, the window kernel tuned and measured, one H100 or H200, one call of 5-9 min:
#   1. attention_check --window_sweep: the kernel's time per form (merged, blocked) for each number of
#      problems a program (1, 2, 4, 8) and warps (2, 4, 8); the fastest per form is used below;
#   2. the guided step at F=64 (the merged form), the kernel off and on;
#   3. the long video's step (F=1152, --frame_chunk 64: the blocked form), off and on;
#   4. if the call has the time (started before 250 s): the 1,152-frame guided video (DPM++ SDE, 6 steps,
#      random full-size weights drawn once, one process), --frame_chunk auto (0 by the plan) and 64 with the
#      kernel off, then 64 with it on.
#   carry: .whl (ftfy, imageio-ffmpeg)
set -u
source benchmarks/gpu/_setup.sh
W=/tmp/w; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt
timeout 200 python3 -m benchmarks.attention_check --window_sweep --json $W/sweep.json > $W/sweep.log 2>&1
TUNE=$(grep "^window_tuning:" $W/sweep.log | sed 's/^window_tuning: //')
echo "tuning: ${TUNE:-none}" | tee $W/tuning.txt; pack
B="python3 -m benchmarks.bench_step --devices 1 --frames 64 --steps 5 --window_tuning=$TUNE"
L="python3 -m benchmarks.bench_step --devices 1 --frames 1152 --steps 3 --matmul_size 1024 --frame_chunk 64"
for K in off on; do
  timeout 75 $B --temporal_kernel $K --out $W/step64_$K.json > $W/step64_$K.log 2>&1; pack
done
for K in off on; do
  timeout 75 $L --window_tuning=$TUNE --temporal_kernel $K --out $W/long_$K.json > $W/long_$K.log 2>&1; pack
done
if [ $SECONDS -lt 250 ]; then
  timeout $((520 - SECONDS)) python3 -m benchmarks.bench_video --window_tuning="$TUNE" \
    --runs=dpmpp_sde:6,dpmpp_sde:6:chunk=64:kernel=off,dpmpp_sde:6:chunk=64:kernel=on --frames=1152 \
    --num_devices=1 --output=/tmp/v1152.mp4 --json=$W/video.json > $W/video.log 2>&1
  echo "exit status $?" >> $W/video.log; pack
fi
echo "== elapsed $SECONDS s"; cat $W/gpu.txt $W/tuning.txt
grep -v "^[IW][0-9]\{4\}" $W/sweep.log | tail -50
for f in step64_off step64_on long_off long_on; do echo "== $f"; grep -v "^[IW][0-9]\{4\}" $W/$f.log | tail -2; done
[ -f $W/video.log ] && grep -v "^[IW][0-9]\{4\}" $W/video.log | grep -v "^step " | tail -8
