#!/usr/bin/env bash
# One GPU, one call: the guided step at F=64 next to the PyTorch baseline (eager and torch.compile), with a
# trace; the same step compiled without Triton GEMMs (compile time and speed of that option), also traced.
# Run from the repo root on the GPU machine:
#   bash benchmarks/gpu/profile_1gpu.sh   (wheels in .whl for diffusers; results under $OUT)
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
B="python3 -m benchmarks.bench_step --devices 1"
timeout 330 $B --frames 64 --torch_baseline --torch_frames 64 --torch_compile --torch_timeout_s 200 \
  --trace_dir /tmp/trace --out "$OUT/step64.json" 2>&1 | tee "$OUT/step64.log"
cp "$(ls -t /tmp/trace/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_D1_F64.json.gz"
timeout 220 $B --frames 64 --compiler_options xla_gpu_enable_triton_gemm=false --trace_dir /tmp/trace_nt \
  --out "$OUT/step64_notriton.json" 2>&1 | tee "$OUT/step64_notriton.log"
cp "$(ls -t /tmp/trace_nt/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_nt_D1_F64.json.gz"
