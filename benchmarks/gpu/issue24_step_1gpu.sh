#!/usr/bin/env bash
# Issue 24, the step's levers, each alone (one H100 or H200, one call): the guided step at F=64 (bench_step, one
# device, dual-scope attention, 5 timed steps) of main before the change (carried as .base/: vinf_jax, benchmarks
# and convert of the commit before), then the candidate (the zero-key temporal attention's queries from the T
# real frames only: one query tile of 64 instead of two for 65), then the candidate with the Pallas GEGLU in
# blocks of 16 rows (--geglu_rows 16), traced; the PyTorch eager baseline first on the same GPU.
#   carry: .base .whl (diffusers for the baseline)
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
B="python3 -m benchmarks.bench_step --devices 1 --frames 64 --steps 5"
(cd .base && timeout 200 $B --torch_baseline --torch_frames 64 --torch_timeout_s 150 --out "$OUT/base64.json") \
  > "$OUT/base64.log" 2>&1
timeout 120 $B --out "$OUT/cand64.json" > "$OUT/cand64.log" 2>&1
timeout 150 $B --geglu_rows 16 --trace_dir /tmp/tr16 --out "$OUT/cand64_rows16.json" > "$OUT/cand64_rows16.log" 2>&1
cp "$(ls -t /tmp/tr16/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_cand64_rows16.json.gz"
echo "== elapsed $SECONDS s"
for f in base64 cand64 cand64_rows16; do echo "== $f"; grep -v "^[IW][0-9]\{4\}" "$OUT/$f.log" | tail -8; done
