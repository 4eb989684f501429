#!/usr/bin/env bash
# Issue 23 (one GPU, one call): the long-video flagfiles under the memory of common cards (the XLA client's
# memory fraction: 24 and 16 GiB; the card's own), default chunks (auto), random full-size weights, one
# process per run: the chunks chosen, the planned and the measured peak, ms per frame-step. Then 64 frames
# unchunked in bfloat16 and float16 on the card's own memory. Runs in order until the time is spent.
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"
G="--weights= --model=videocrafter2 --steps=2 --compilation_cache_dir= --output=/tmp/v.mp4"
T="--weights= --model=videocrafter2_turbo --compilation_cache_dir= --output=/tmp/t.mp4"
run() {  # name, budget GiB, flags...
  local name=$1 budget=$2; shift 2
  if [ "$SECONDS" -gt "${LIMIT:-470}" ]; then echo "skipped $name (time)"; return; fi
  timeout 240 python3 -m benchmarks.memory_check --budget_gib "$budget" --out "$OUT/mem_$name.json" -- "$@" \
    > "$OUT/mem_$name.log" 2>&1
  echo "$name: $(tail -1 "$OUT/mem_$name.log" | cut -c1-600)"
}
run g24_bf16_1152 24 --flagfile configs/long_video.flags $G --frame_chunk=auto --decode_chunk=auto
run g16_fp16_256 16 --flagfile configs/long_video.flags $G --frames=256 --dtype=float16 --frame_chunk=auto --decode_chunk=auto
run t24_bf16_1152 24 --flagfile configs/turbo_long_video.flags $T --frame_chunk=auto --decode_chunk=auto
run g0_bf16_64_c0 0 --flagfile configs/long_video.flags $G --frames=64 --frame_chunk=0 --decode_chunk=8
run g0_fp16_64_c16 0 --flagfile configs/long_video.flags $G --frames=64 --frame_chunk=16 --decode_chunk=8 --dtype=float16
run g48_bf16_1152 48 --flagfile configs/long_video.flags $G --frame_chunk=auto --decode_chunk=auto
echo "== elapsed $SECONDS s"
