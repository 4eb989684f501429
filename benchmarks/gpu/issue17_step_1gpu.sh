#!/usr/bin/env bash
# Issue 17, second call (one H200): the step after the change next to the PyTorch baseline (eager and
# torch.compile at F=64, first, on the same GPU), at F=64 (traced, HLO kept) and F=256; the memory mode
# (--frame_chunk 16) at 1,152 frames; compile time of the memory mode at 64, 1,152 and 4,096 frames, cold and
# warm (persistent cache, second process); then the elementwise pieces one by one if time is left.
# Everything lands in $OUT/all.tgz (the device tool returns at most 8 files), refreshed after each phase.
#   carry: .whl (diffusers for the baseline)
set -u
source benchmarks/gpu/_setup.sh
W=/tmp/w; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt
B="python3 -m benchmarks.bench_step --devices 1 --steps 5"
timeout 330 $B --frames 64,256 --torch_baseline --torch_frames 64 --torch_compile --torch_timeout_s 240 \
  --trace_dir /tmp/tr --hlo_dir $W/hlo --out $W/step.json > $W/step.log 2>&1
cp "$(ls -t /tmp/tr/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" $W/trace_D1_F64.json.gz; pack
timeout 110 $B --frames 1152 --frame_chunk 16 --steps 2 --matmul_size 4096 --out $W/chunk1152.json \
  > $W/chunk1152.log 2>&1; pack
timeout 120 python3 -m benchmarks.compile_probe --frames 64,1152,4096 --frame_chunk 16 --json $W/compile_cold.json \
  > $W/compile_cold.log 2>&1; pack
mkdir -p /tmp/cc
for r in fill warm; do
  timeout 60 python3 -m benchmarks.compile_probe --frames 4096 --frame_chunk 16 --cache_dir /tmp/cc \
    --json $W/compile_$r.json > $W/compile_$r.log 2>&1
done; pack
if [ "$SECONDS" -lt 480 ]; then
  timeout $((560 - SECONDS)) python3 -m benchmarks.kernel_probe --reps 10 --only copy,geglu,ff --json $W/kernel_probe.json \
    > $W/kernel_probe.log 2>&1; pack
fi
echo "== elapsed $SECONDS s"
for f in step chunk1152 compile_cold compile_fill compile_warm kernel_probe; do echo "== $f"; tail -7 $W/$f.log 2>/dev/null; done
