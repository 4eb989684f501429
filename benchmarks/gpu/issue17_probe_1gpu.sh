#!/usr/bin/env bash
# Issue 17, first call (one H200): where the step's time goes and which formulation of each piece is fastest.
# The code of main before the change is carried as .base/ (vinf_jax + benchmarks, copied at c2188ff), so both
# versions of the step run in one call, with the PyTorch eager baseline on the same GPU.
#   carry: .base .whl (diffusers for the baseline)
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
B="python3 -m benchmarks.bench_step --devices 1 --frames 64 --steps 5"
# 1. main before the change, traced, with the PyTorch eager baseline first
(cd .base && timeout 150 $B --torch_baseline --torch_frames 64 --torch_timeout_s 100 --trace_dir /tmp/trb \
  --out "$OUT/base64.json") > "$OUT/base64.log" 2>&1
cp "$(ls -t /tmp/trb/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_base64.json.gz"
# 2. the candidate with plain-JAX elementwise passes, and 3. with the Pallas GEGLU; traced, optimised HLO kept
timeout 100 $B --kernel_impl jax --trace_dir /tmp/trj --hlo_dir /tmp/hloj --out "$OUT/cand64_jax.json" \
  > "$OUT/cand64_jax.log" 2>&1
cp "$(ls -t /tmp/trj/D1_F64/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$OUT/trace_cand64_jax.json.gz"
cp /tmp/hloj/D1_F64.hlo.gz "$OUT/hlo_cand64_jax.hlo.gz"
timeout 100 $B --kernel_impl pallas --out "$OUT/cand64_pallas.json" > "$OUT/cand64_pallas.log" 2>&1
# 4. compile time of the memory mode (frame_chunk 16) at 64 and 4,096 frames, the candidate (temporal convs
#    chunked by positions); then main before the change at 4,096 with XLA's autotuning log, if time is left
mkdir -p /tmp/atl
for F in 64 4096; do
  XLA_FLAGS=--xla_gpu_dump_autotune_logs_to=/tmp/atl/cand$F.txt timeout 130 python3 -m benchmarks.compile_probe \
    --frames $F --frame_chunk 16 --json "$OUT/compile_cand$F.json" > "$OUT/compile_cand$F.log" 2>&1
done
tar czf "$OUT/autotune_logs.tgz" -C /tmp/atl . 2>/dev/null
# 5. the pieces one by one
timeout 100 python3 -m benchmarks.kernel_probe --reps 10 --json "$OUT/kernel_probe.json" > "$OUT/kernel_probe.log" 2>&1
if [ "$SECONDS" -lt 420 ]; then
  (cd .base && XLA_FLAGS=--xla_gpu_dump_autotune_logs_to=/tmp/atl/base4096.txt timeout $((560 - SECONDS)) \
    python3 -m benchmarks.bench_step --devices 1 --frames 4096 --frame_chunk 16 --steps 1 --matmul_size 1024 \
    --out "$OUT/base4096.json") > "$OUT/base4096.log" 2>&1
  tar czf "$OUT/autotune_logs.tgz" -C /tmp/atl . 2>/dev/null
fi
echo "== elapsed $SECONDS s"
for f in base64 cand64_jax cand64_pallas compile_cand64 compile_cand4096 kernel_probe base4096; do echo "== $f"; tail -6 "$OUT/$f.log" 2>/dev/null; done
