#!/usr/bin/env bash
# Run here (not on the GPU machine) before benchmarks/gpu/app_1gpu.sh: what the GPU image lacks for the web page,
# unpacked from wheels and packed as one .whl/site.tar.xz (git-ignored; carry=[".whl"]; _setup.sh unpacks it).
# The plain wheels do not fit the call's 64 MiB: Gradio's (31 MB) holds a 32 MB ffmpeg.wasm (the browser-side
# video trimmer, unused here) and demo media, and imageio-ffmpeg 0.8 a 173 MB ffmpeg. So: Gradio without those,
# imageio-ffmpeg 0.5.1 (ffmpeg 4.2.2, 74 MB, xz'd with the rest): ~36 MB in all. What the image has
# (numpy, pandas, pillow, httpx, huggingface_hub, typer, jinja2, ...) is left out.
set -eu
cd "$(dirname "$0")/../.."
W=$(mktemp -d); S=$W/site; mkdir -p "$S" .whl
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform any"
python3 -m pip download -q $P -d "$W/w" gradio==6.31.0 gradio_client==2.7.2 fastapi starlette uvicorn pydantic \
  pydantic_core annotated_types typing_inspection annotated_doc opentelemetry-api orjson brotli pydub python_multipart \
  safehttpx==0.1.7 semantic_version tomlkit groovy hf_gradio pytz ftfy wcwidth imageio-ffmpeg==0.5.1
for w in "$W"/w/*.whl; do unzip -o -q "$w" -d "$S"; done
rm -rf "$S"/gradio/templates/frontend/static/ffmpeg "$S"/gradio/media_assets "$S"/gradio/CHANGELOG.md
tar -cf - -C "$W" site | xz -6 -T0 > .whl/site.tar.xz
rm -rf "$W"; ls -la .whl
