#!/usr/bin/env bash
# One GPU, one call: the temporal attention's cuDNN path checked against XLA and float32
# (benchmarks/attention_check.py), then the guided step at F=64 traced, with XLA's default GEMM
# emitters (Triton) and with cuBLAS only (xla_gpu_enable_triton_gemm=false). Results under $OUT.
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 -m benchmarks.attention_check --json "$OUT/attention_check.json" 2>&1 | tee "$OUT/attention_check.log"
B="python3 -m benchmarks.bench_step --devices 1 --frames 64"
timeout 200 $B --trace_dir /tmp/tr_d --out "$OUT/step64_default.json" 2>&1 | tee "$OUT/step64_default.log"
cp "$(ls -t /tmp/tr_d/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_default.json.gz"
timeout 160 $B --compiler_options xla_gpu_enable_triton_gemm=false --trace_dir /tmp/tr_n \
  --out "$OUT/step64_notriton.json" 2>&1 | tee "$OUT/step64_notriton.log"
cp "$(ls -t /tmp/tr_n/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_notriton.json.gz"
