#!/usr/bin/env bash
# Run here (not on the GPU machine) before a call: the Python packages the GPU image lacks, as wheels in .whl/
# (git-ignored; pass carry=[".whl"] to the call; _setup.sh installs them there). diffusers: the PyTorch
# baseline; ftfy + wcwidth: the tokenizer (every pipeline run); imageio-ffmpeg: mp4 output (bench_video).
set -eu
cd "$(dirname "$0")/../.."
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d .whl"
python3 -m pip download -q $P diffusers==0.42.1 importlib_metadata ftfy wcwidth imageio-ffmpeg
ls -la .whl
