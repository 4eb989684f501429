#!/usr/bin/env bash
# Not run yet (2026-12-07: no machine came for it); the figures it would refresh are in RESULTS.md.
# Issue 24, the step as it ships (window kernel on, 4 problems and 4 warps a program in both forms), one H100 or
# H200, one call of about 8 min: the PyTorch baselines at F=64 (diffusers UNet3D fp16, eager and torch.compile)
# first, then ours at F=64 with the kernel on (traced after the timed steps) and off, then the long video's step
# (F=1152, --frame_chunk 64: the blocked form) on and off.   carry: .whl (diffusers for the baseline)
set -u
source benchmarks/gpu/_setup.sh
W=/tmp/w; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt
B="python3 -m benchmarks.bench_step --devices 1 --frames 64 --steps 5"
L="python3 -m benchmarks.bench_step --devices 1 --frames 1152 --steps 3 --matmul_size 1024 --frame_chunk 64"
timeout 230 $B --devices= --torch_baseline --torch_compile --torch_frames 64 --torch_timeout_s 220 \
  --out $W/torch64.json > $W/torch64.log 2>&1; pack
timeout 80 $B --trace_dir /tmp/trk --out $W/step64_on.json > $W/step64_on.log 2>&1
cp "$(ls -t /tmp/trk/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" $W/trace_step64_on.json.gz; pack
timeout 70 $B --temporal_kernel off --out $W/step64_off.json > $W/step64_off.log 2>&1; pack
for K in on off; do
  timeout 80 $L --temporal_kernel $K --out $W/long_$K.json > $W/long_$K.log 2>&1; pack
done
echo "== elapsed $SECONDS s"; cat $W/gpu.txt
for f in torch64 step64_on step64_off long_on long_off; do echo "== $f"; grep -v "^[IW][0-9]\{4\}" $W/$f.log | tail -4; done
