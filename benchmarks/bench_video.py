r"""End-to-end time of one long video: text encoding, the sampling steps, VAE decode and the written file.

  python -m benchmarks.bench_video --frames=1152 --num_devices=2 --frame_chunk=16 \
    --compilation_cache_dir=/tmp/vinf_cache --json=video.json --output=video.mp4

Full-size VideoCrafter2 with random weights (the timings do not depend on the values; a converted
directory can be given with --weights), 320x512, DPM-Solver++ SDE 30 steps, guidance 12, dual-scope
attention P=8, G=16: the paper's setting. Compilation is reported apart from the run; run the same
command twice with one --compilation_cache_dir to see the cold and the warm compile (JAX's persistent
cache). ``--compile_only`` loads and compiles (the step and the decoder) and stops: the warm compile of a
command that ran before, or a cold compile that fills the cache for the command after it. Prints a table
and writes the sidecar's timings plus the settings to --json.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_integer("frames", 1152, "Frames of the video.")
flags.DEFINE_integer("num_devices", 0, "Devices (0 = all).")
flags.DEFINE_integer("steps", 30, "Sampling steps.")
flags.DEFINE_integer("height", 320, "Video height.")
flags.DEFINE_integer("width", 512, "Video width.")
flags.DEFINE_integer("frame_chunk", 16, "Frames per chunk of the UNet's per-frame layers (0 = all).")
flags.DEFINE_integer("decode_chunk", 8, "Frames each device decodes at a time.")
flags.DEFINE_string("model", "videocrafter2", "Model preset for random weights.")
flags.DEFINE_string("weights", "", "A converted weights directory instead of random weights.")
flags.DEFINE_string("dtype", "auto", "Compute dtype.")
flags.DEFINE_string("output", "bench_video.mp4", "Where the video goes (.mp4, .gif or a directory).")
flags.DEFINE_string("compilation_cache_dir", "", "JAX persistent compilation cache (empty = off).")
flags.DEFINE_string("json", "", "Write the results here.")
flags.DEFINE_bool("compile_only", False, "Load and compile only (no sampling, no video).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from vinf_jax import pipeline

  cfg = pipeline.GenerationConfig(
    prompts=("a drone shot flying over a snowy mountain range at sunrise, highly detailed",),
    model=FLAGS.model if not FLAGS.weights else "",
    weights=FLAGS.weights,
    frames=FLAGS.frames,
    height=FLAGS.height,
    width=FLAGS.width,
    fps=24,
    sampler="dpmpp_sde",
    steps=FLAGS.steps,
    guidance=12.0,
    attention="dual",
    window=8,
    num_global=16,
    dtype=FLAGS.dtype,
    num_devices=FLAGS.num_devices,
    frame_chunk=FLAGS.frame_chunk,
    decode_chunk=FLAGS.decode_chunk,
    export_fps=24.0,
    output=FLAGS.output,
    compilation_cache_dir=FLAGS.compilation_cache_dir,
    compile_only=FLAGS.compile_only,
  )
  t0 = time.perf_counter()
  result = pipeline.generate(cfg)
  wall = time.perf_counter() - t0
  tm = result.sidecar["timings_s"]
  compile_s = tm["compile"] + tm["decode_compile"]
  out = {
    "frames": cfg.frames,
    "devices": result.sidecar["devices"],
    "versions": result.sidecar["versions"],
    "date": time.strftime("%Y-%m-%d"),
    "command": " ".join(sys.argv),
    "compile_only": cfg.compile_only,
    "timings_s": tm,
    "compile_s": compile_s,
    "wall_s": wall,
  }
  if not cfg.compile_only:
    run_s = tm["encode"] + tm["denoise"] + tm["decode"] + tm["write"]
    out.update(excluding_compile_s=run_s, ms_per_frame_step=1000 * tm["denoise"] / (cfg.frames * result.num_steps))
  if jax.process_index() == 0:
    d = out["devices"]
    what = "compile only" if cfg.compile_only else f"{result.num_steps} steps"
    print(f"\n{'video':<34}{cfg.frames} frames {cfg.height}x{cfg.width}, {what}, {d['count']} x {d['kind']}")
    for k in ("load", "encode", "compile", "denoise", "decode_compile", "decode", "write"):
      if k in tm:
        print(f"  {k:<32}{tm[k]:8.2f} s")
    if not cfg.compile_only:
      print(f"  {'excluding compile (enc+steps+dec+write)':<32}{out['excluding_compile_s']:8.2f} s")
    print(f"  {'compile (step + decode)':<32}{compile_s:8.2f} s")
    if not cfg.compile_only:
      print(f"  {'per frame-step (denoise)':<32}{out['ms_per_frame_step']:8.3f} ms")
    if FLAGS.json:
      os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
      with open(FLAGS.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
