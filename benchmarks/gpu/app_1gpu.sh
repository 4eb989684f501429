#!/usr/bin/env bash
# One GPU, one call (about 4 minutes): the web page's requests on the full-size model with random weights, no
# browser. 64 frames at 320x512 (window 8, 16 global frames), 10 steps; 3 requests: the first compiles, the
# second reuses the programs, the third is cancelled after its first step.
#   1) through vinf_jax.app.Handler (what the page calls; no Gradio needed);
#   2) through the page's HTTP API with gradio_client, the server in the same process: GET / (the page's HTML),
#      then the same requests; the mp4 the client downloads is decoded. Needs .whl/site.tar.xz
#      (benchmarks/gpu/app_bundle.sh; carry=[".whl"]). The second compile is warm (one persistent cache).
set -u
source benchmarks/gpu/_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u
python3 -c "import jax, gradio; print('jax', jax.__version__, jax.devices(), 'gradio', gradio.__version__)"
A="python3 -m benchmarks.app_requests --model=videocrafter2 --frames=64 --height=320 --width=512 --steps=10"
A="$A --window=8 --num_global=16 --num_devices=1 --requests=3 --cancel_last --outputs_dir=/tmp/app_out"
A="$A --compilation_cache_dir=/tmp/app_cache"
timeout 250 $A --via=handler --json="$OUT/app_handler.json" > "$OUT/app_handler.log" 2>&1
echo "== handler (exit $?)"; tail -30 "$OUT/app_handler.log"
if python3 -c "import gradio, gradio_client" 2>/dev/null; then
  timeout 250 $A --via=http --json="$OUT/app_http.json" > "$OUT/app_http.log" 2>&1
  echo "== http (exit $?)"; tail -30 "$OUT/app_http.log"
else
  echo "== http: gradio does not import here (benchmarks/gpu/app_bundle.sh, carry .whl); skipped"
  python3 -c "import gradio, gradio_client" 2>&1 | tail -3
fi
ls -la /tmp/app_out
