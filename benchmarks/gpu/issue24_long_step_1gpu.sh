#!/usr/bin/env bash
# Issue 24, the long video's step (one H100 or H200, one call): the guided step at F=1152 on one device
# (bench_step, dual-scope P=8 G=16), its query block automatic (64 frames: 96 keys a block) and 96 or 128 frames
# (128 or 160 keys: fewer K/V window copies, more keys per query). 3 timed steps each.
# 2026-12-07, one H100: without frame chunking (the first three runs) bench_step's program asks for 76.6 GiB and
# does not fit an 80 GB card, so the same call went on with --frame_chunk 64 (what --frame_chunk=auto chooses for
# 1,152 turbo frames; the last loop), results/2026-12-07/5_long_step_h100/.
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
B="python3 -m benchmarks.bench_step --devices 1 --frames 1152 --steps 3 --matmul_size 1024"
timeout 170 $B --trace_dir /tmp/trl --out "$OUT/long_qb0.json" > "$OUT/long_qb0.log" 2>&1
for Q in 96 128; do
  timeout 150 $B --query_block $Q --out "$OUT/long_qb$Q.json" > "$OUT/long_qb$Q.log" 2>&1
done
for Q in 0 128; do
  timeout 120 $B --frame_chunk 64 --query_block $Q --out "$OUT/long_fc64_qb$Q.json" > "$OUT/long_fc64_qb$Q.log" 2>&1
done
echo "== elapsed $SECONDS s"
for f in long_qb0 long_qb96 long_qb128 long_fc64_qb0 long_fc64_qb128; do
  echo "== $f"; grep -v "^[IW][0-9]\{4\}" "$OUT/$f.log" | tail -4
done
