#!/usr/bin/env bash
# A 4-GPU machine, one call (about 9 minutes): the guided step at 64 and 256 frames per GPU on 4 GPUs, then
# side by side on disjoint GPUs: 1 GPU (GPU 0, after the PyTorch eager baseline on it), 2 GPUs (GPUs 2-3),
# and the PyTorch baseline eager + torch.compile alone on GPU 1. Every run traced. Results under $OUT; then
#   python -m benchmarks.results_table --rows step_d1.json step_d2.json step_d4.json torch_compile.json
set -u
source benchmarks/gpu/_setup.sh
B="python3 -m benchmarks.bench_step --frames 64,256"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m; } > "$OUT/step_d4.log" 2>&1
timeout 200 $B --devices 4 --trace_dir /tmp/tr4 --out "$OUT/step_d4.json" >> "$OUT/step_d4.log" 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 330 $B --devices 1 --torch_baseline --torch_frames 64 --torch_timeout_s 120 \
  --trace_dir /tmp/tr1 --out "$OUT/step_d1.json" > "$OUT/step_d1.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 370 python3 -m benchmarks.bench_step --devices= --torch_baseline --torch_compile \
  --torch_frames 64 --torch_timeout_s 300 --out "$OUT/torch_compile.json" > "$OUT/torch_compile.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 timeout 250 $B --devices 2 --trace_dir /tmp/tr2 --out "$OUT/step_d2.json" \
  > "$OUT/step_d2.log" 2>&1 &
wait
for f in step_d4 step_d1 step_d2 torch_compile; do echo "== $f"; grep -E "^D=|torch|weak|Error|error" "$OUT/$f.log" | tail -8; done
python3 -m benchmarks.results_table --rows "$OUT"/step_d1.json "$OUT"/step_d2.json "$OUT"/step_d4.json \
  "$OUT"/torch_compile.json | cut -c1-170
