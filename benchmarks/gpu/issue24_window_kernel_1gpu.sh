#!/usr/bin/env bash
# Issue 24, the temporal attention's Pallas window kernel (vinf_jax.layers.kernels.window_attention; off by
# default until this call has measured it), one H100 or H200, one call of at most ~9.5 min:
#   1. attention_check --window_kernel: the kernel against XLA in float32 (bf16 bound 1e-2) and its time
#      against cuDNN's fused attention at the UNet's shapes (level 0 and 2 at F=64, 256 frames in blocks,
#      one chunk of positions of the 1,152-frame video);
#   2. the guided step at F=64, the PyTorch baselines first (eager and torch.compile, same GPU), then ours
#      with --temporal_kernel off and on (the latter traced);
#   3. the long video's step (F=1152, --frame_chunk 64), off and on.
#   carry: .whl (diffusers for the baseline)
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 -m benchmarks.attention_check --window_kernel --json "$OUT/window_kernel.json" \
  > "$OUT/window_kernel.log" 2>&1
B="python3 -m benchmarks.bench_step --devices 1 --frames 64 --steps 5"
# torch.compile alone took 145 s on 2026-12-07 (an H100): 200 s here cut ours off after the baselines
timeout 300 $B --torch_baseline --torch_compile --torch_frames 64 --torch_timeout_s 170 --out "$OUT/off64.json" \
  > "$OUT/off64.log" 2>&1
timeout 100 $B --temporal_kernel on --trace_dir /tmp/trk --out "$OUT/on64.json" > "$OUT/on64.log" 2>&1
cp "$(ls -t /tmp/trk/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_on64.json.gz"
L="python3 -m benchmarks.bench_step --devices 1 --frames 1152 --steps 3 --matmul_size 1024 --frame_chunk 64"
for K in off on; do
  timeout 90 $L --temporal_kernel $K --out "$OUT/long_$K.json" > "$OUT/long_$K.log" 2>&1
done
# at most 8 files come back from a call: everything in one archive as well
tar czf "$OUT/all.tgz" -C "$OUT" --exclude=all.tgz . 2>/dev/null
echo "== elapsed $SECONDS s"
grep -v "^[IW][0-9]\{4\}" "$OUT/window_kernel.log" | tail -10
for f in off64 on64 long_off long_on; do echo "== $f"; grep -v "^[IW][0-9]\{4\}" "$OUT/$f.log" | tail -6; done
