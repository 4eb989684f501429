#!/usr/bin/env bash
# Issue 24, fp8 (one H100 or H200, one call, < 8 min with compiles): the guided step at F=64, 320x512, in bf16 and
# in --precision=fp8 (ms per frame-step, the count of cuBLASLt fp8 GEMMs XLA made), and the error of the final
# latents after 30 guided and 4 turbo steps: fp8 against bf16 (F=64 and F=16) next to bf16 against float32
# (F=16: the float32 reference is kept small to fit the call). Random full-size weights: quality on real
# weights is not measured.   carry: nothing
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt"
timeout 470 python3 -m benchmarks.fp8_check --frames=64 --ref_frames=16 --budget_s=400 \
  --out="$OUT/fp8_check.json" > "$OUT/fp8_check.log" 2>&1
echo "== exit $? after $SECONDS s"; grep -v "^[IW][0-9]\{4\}" "$OUT/fp8_check.log" | tail -20
