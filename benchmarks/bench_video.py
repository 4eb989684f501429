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

import contextlib
import json
import os
import sys
import time

from absl import app, flags

from benchmarks import options

flags.DEFINE_integer("frames", 1152, "Frames of the video.")
flags.DEFINE_integer("num_devices", 0, "Devices (0 = all).")
flags.DEFINE_integer("steps", 30, "Sampling steps.")
flags.DEFINE_integer("height", 320, "Video height.")
flags.DEFINE_integer("width", 512, "Video width.")
flags.DEFINE_string("frame_chunk", "auto", "Frames per chunk of the UNet's per-frame layers (0 = all, auto = plan).")
flags.DEFINE_string("decode_chunk", "auto", "Frames each device decodes at a time (auto = the memory plan's).")
flags.DEFINE_string("model", "videocrafter2", "Model preset for random weights.")
flags.DEFINE_string("weights", "", "A converted weights directory instead of random weights.")
flags.DEFINE_string("dtype", "auto", "Compute dtype.")
flags.DEFINE_string("output", "bench_video.mp4", "Where the video goes (.mp4, .gif or a directory).")
flags.DEFINE_string("compilation_cache_dir", "", "JAX persistent compilation cache (empty = off).")
flags.DEFINE_string("json", "", "Write the results here.")
flags.DEFINE_bool("compile_only", False, "Load and compile only (no sampling, no video).")
flags.DEFINE_string("window_tuning", "", "The window kernel's FORM=N:W,... (as bench_step's --window_tuning).")
flags.DEFINE_list(
  "runs",
  [],
  "Several videos in one process, SAMPLER:STEPS[:OPTION...] each (e.g. turbo:4,turbo:4:sequential,dpmpp_sde:30; "
  "sequential: decode every frame, then write the mp4, instead of writing each piece as it is decoded; chunk=N: "
  "this run's --frame_chunk; kernel=on|off|merged: the window kernel for this run, attention.TEMPORAL_KERNEL), turbo "
  "runs first: random "
  "weights of --model's T2V-Turbo variant drawn once, the guided samplers on the same arrays without time_cond_proj "
  "(VideoCrafter2), each run with the settings of its sampler's flagfile (turbo: w 7.5 embedded, fps 16, global "
  "phase on the first step; guided: guidance 12, fps 24). Empty: one run of --steps with dpmpp_sde.",
)
FLAGS = flags.FLAGS


def run_config(base, sampler: str, steps: int):
  import dataclasses

  if sampler == "turbo":  # configs/turbo_long_video.flags
    return dataclasses.replace(
      base, model=base.model + "_turbo", sampler="turbo", steps=steps, guidance=7.5, fps=16, global_phase_steps=1
    )
  return dataclasses.replace(base, sampler=sampler, steps=steps)  # configs/long_video.flags


def models_for(cfg, plan, loaded: dict):
  """Models of ``cfg``'s preset and the seconds they took. Random weights are drawn once (``load_models``); a
  second preset that differs only by T2V-Turbo's conditioning projections (VideoCrafter2 and its turbo
  variant) reuses the first's arrays: its UNet is the other's without (or, drawn, with) those projections."""
  import dataclasses

  from flax import nnx

  from vinf_jax import pipeline
  from vinf_jax.models import unet3d
  from vinf_jax.pipeline.programs import Programs

  t0 = time.perf_counter()
  if not loaded:
    loaded[cfg.model] = pipeline.load_models(cfg, plan)
  elif cfg.model not in loaded:
    other = next(iter(loaded.values()))
    model = plan.model.with_dtype(plan.dtype)
    graphdef, want = nnx.split(unet3d.abstract(model.unet))
    have = nnx.to_pure_dict(nnx.state(other.unet))
    missing = set(nnx.to_pure_dict(want)) - set(have)
    if missing:
      raise ValueError(f"{cfg.model!r} has UNet parameters {sorted(missing)} that {other.config.name!r} lacks")
    nnx.replace_by_pure_dict(want, {k: v for k, v in have.items() if k in nnx.to_pure_dict(want)})
    loaded[cfg.model] = dataclasses.replace(other, config=model, unet=nnx.merge(graphdef, want), programs=Programs())
  return loaded[cfg.model], time.perf_counter() - t0


def _chunk(value: str) -> int | str:
  return value if value == "auto" else int(value)


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
    frame_chunk=_chunk(FLAGS.frame_chunk),
    decode_chunk=_chunk(FLAGS.decode_chunk),
    export_fps=24.0,
    output=FLAGS.output,
    compilation_cache_dir=FLAGS.compilation_cache_dir,
    compile_only=FLAGS.compile_only,
  )
  if FLAGS.window_tuning:
    from vinf_jax.layers import kernels

    kernels.WINDOW_TUNING.update(options.parse_window_tuning(FLAGS.window_tuning))
  if FLAGS.runs:
    return multi_run(cfg)
  t0 = time.perf_counter()
  result = pipeline.generate(cfg)
  wall = time.perf_counter() - t0
  out = record(cfg, result, wall)
  if jax.process_index() == 0:
    print_table(cfg, result, out)
    if FLAGS.json:
      os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
      with open(FLAGS.json, "w") as f:
        json.dump(out, f, indent=1)


@contextlib.contextmanager
def sequential_write(on: bool):
  """With ``on``: the decode gathers every frame before the mp4 is written (the way before the streamed
  write), to measure decode and write alone."""
  from vinf_jax.pipeline import run as run_lib

  real = run_lib.streams
  if on:
    run_lib.streams = lambda cfg: False
  try:
    yield
  finally:
    run_lib.streams = real


@contextlib.contextmanager
def temporal_kernel(mode: str | None):
  """``attention.TEMPORAL_KERNEL`` set to ``mode`` (None: left as it is) inside, restored after."""
  from vinf_jax.layers import attention

  real = attention.TEMPORAL_KERNEL
  attention.TEMPORAL_KERNEL = mode or real
  try:
    yield attention.TEMPORAL_KERNEL
  finally:
    attention.TEMPORAL_KERNEL = real


def multi_run(base):
  import dataclasses

  import jax

  from vinf_jax import pipeline
  from vinf_jax.pipeline.programs import Programs

  runs, loaded = [], {}
  # turbo runs first: the T2V-Turbo UNet is drawn, VideoCrafter2's is the same arrays without time_cond_proj
  items = sorted(FLAGS.runs, key=lambda r: not r.startswith("turbo"))
  parsed = [options.parse_run(item) for item in items]  # every entry checked before anything loads
  for sampler, steps, opts in parsed:
    cfg = run_config(base, sampler, steps)
    if opts["chunk"] is not None:
      cfg = dataclasses.replace(cfg, frame_chunk=opts["chunk"])
    plan = pipeline.validate(cfg)
    models, load_s = models_for(cfg, plan, loaded)
    if opts["kernel"]:  # read at trace time: this run's programs are compiled afresh, not taken from another's
      models = dataclasses.replace(models, programs=Programs())
    t0 = time.perf_counter()
    with sequential_write(opts["sequential"]), temporal_kernel(opts["kernel"]) as kernel:
      result = pipeline.generate(cfg, models=models)
    out = record(cfg, result, time.perf_counter() - t0)
    out["write_mode"] = "sequential" if opts["sequential"] else "streamed"
    out.update(frame_chunk=result.sidecar["settings"]["frame_chunk"], temporal_kernel=kernel)
    out["timings_s"]["load"] = load_s  # this run's share of drawing the random weights (0 once drawn)
    out.update(sampler=cfg.sampler, steps=result.num_steps, model=cfg.model)
    runs.append(out)
    if jax.process_index() == 0:
      print_table(cfg, result, out)
      if FLAGS.json:  # rewritten after every run: a call cut short keeps what it measured
        with open(FLAGS.json, "w") as f:
          json.dump({"runs": runs, "command": " ".join(sys.argv)}, f, indent=1)
  if jax.process_index() == 0:
    print(f"\n{'run':<20}{'steps':>6}{'denoise s':>11}{'excl. compile s':>17}{'compile s':>11}")
    for r in runs:
      tm = r["timings_s"]
      print(
        f"{r['sampler']:<20}{r['steps']:>6}{tm['denoise']:>11.2f}{r['excluding_compile_s']:>17.2f}{r['compile_s']:>11.2f}"
      )


def record(cfg, result, wall) -> dict:
  """The JSON record of one run: the sidecar's timings, devices and versions, and the derived figures."""
  tm = result.sidecar["timings_s"]
  compile_s = tm["compile"] + tm["decode_compile"] + tm.get("text_compile", 0.0)
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
  return out


def print_table(cfg, result, out):
  tm, compile_s, d = out["timings_s"], out["compile_s"], out["devices"]
  what = "compile only" if cfg.compile_only else f"{result.num_steps} steps"
  print(f"\n{'video':<34}{cfg.frames} frames {cfg.height}x{cfg.width}, {what}, {d['count']} x {d['kind']}")
  for k in (
    "load",
    "text_compile",
    "encode",
    "compile",
    "denoise",
    "decode_compile",
    "decode",
    "write",
    "decode_write",
  ):
    if k in tm:
      print(f"  {k:<32}{tm[k]:8.2f} s")
  if not cfg.compile_only:
    print(f"  {'excluding compile (enc+steps+dec+write)':<32}{out['excluding_compile_s']:8.2f} s")
  print(f"  {'compile (text + step + decode)':<32}{compile_s:8.2f} s")
  if not cfg.compile_only:
    print(f"  {'per frame-step (denoise)':<32}{out['ms_per_frame_step']:8.3f} ms")


if __name__ == "__main__":
  app.run(main)
