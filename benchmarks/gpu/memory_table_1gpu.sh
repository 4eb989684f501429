#!/usr/bin/env bash
# Issue 23 (one GPU, one call): refresh the memory plan's table for the full-size model at 320x512 from
# XLA's plans of the real step and decode programs (abstract weights: compile only), bfloat16 guided and
# turbo, then float16 guided; 6 compiles at a time. The entries come back in $OUT/memory_table_*.json.
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"
timeout 330 python3 -m benchmarks.memory_table --model videocrafter2 --dtypes bfloat16 --kinds guided,turbo \
  --workers 6 --out "$OUT/memory_table_bf16.json" > "$OUT/memory_table_bf16.log" 2>&1
timeout 200 python3 -m benchmarks.memory_table --model videocrafter2 --dtypes float16 --kinds guided \
  --workers 6 --out "$OUT/memory_table_fp16.json" > "$OUT/memory_table_fp16.log" 2>&1
echo "== elapsed $SECONDS s"; grep -h "GiB\|check\|Error" "$OUT"/memory_table_*.log | tail -40
