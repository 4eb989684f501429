#!/usr/bin/env bash
# A 4-GPU machine, third call for issue 8 (run as this one command line, right after max_frames_4gpu_b.sh
# on the same machine): the same 4 x 4,096 frames compiled with cuBLAS GEMMs, the sampler's options
# (bench_step now uses them by default), then a probe at 4 x 6,144 if the call's time allows.
source benchmarks/gpu/_setup.sh; date -u; timeout 560 python3 -m benchmarks.bench_step --devices 4 --frames 4096 --frame_chunk 16 --steps 1 --compiler_options xla_gpu_enable_triton_gemm=false --find_max_frames --max_frames_step 1024 --max_frames_limit 6144 --time_budget_s 540 --out "$OUT/max_frames_d4_c.json" > "$OUT/max_frames_d4_c.log" 2>&1; echo "exit $?"; date -u; grep -v cuda_timer "$OUT/max_frames_d4_c.log" | tail -12
