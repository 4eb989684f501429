r"""Compile time of the guided step, apart from everything else: lower and compile only, no weights drawn.

  python -m benchmarks.compile_probe --frames 64,4096 --frame_chunk 16 [--compiler_options k=v,...] [--json f]

The full-size UNet's parameters are zeros placed on the device (compiling needs their shapes and
placement, not their values), so each (F, options) costs only the lowering and XLA's compile. Run under
``XLA_FLAGS=--xla_gpu_dump_autotune_logs_to=FILE`` to see what the autotuner measured. One device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bench_step import _option_value
from vinf_jax import parallel, sampling
from vinf_jax.config import TemporalConfig, preset
from vinf_jax.models import unet3d


def zeros_model(cfg):
  graphdef, state = nnx.split(unet3d.abstract(cfg))
  state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state)
  return nnx.merge(graphdef, state)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--frames", default="64")
  ap.add_argument("--frame_chunk", type=int, default=0)
  ap.add_argument("--preset", default="videocrafter2")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--height", type=int, default=320)
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--window", type=int, default=8)
  ap.add_argument("--num_global", type=int, default=16)
  ap.add_argument("--compiler_options", default="", help="k=v,... over parallel.compiler_options()")
  ap.add_argument("--cache_dir", default="", help="JAX's persistent compilation cache (a second run loads from it)")
  ap.add_argument("--json", default="")
  a = ap.parse_args(argv)
  if a.cache_dir:
    jax.config.update("jax_compilation_cache_dir", a.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  cfg = preset(a.preset).unet
  import dataclasses

  cfg = dataclasses.replace(cfg, dtype=a.dtype, param_dtype=a.dtype)
  opts = dict(parallel.compiler_options() or {})
  for item in filter(None, a.compiler_options.split(",")):
    k, _, v = item.partition("=")
    opts[k.strip()] = _option_value(v.strip())
  model = zeros_model(cfg)
  temporal = TemporalConfig(attention="dual", window=a.window, num_global=a.num_global)
  plan = sampling.make_plan(sampling.SamplerConfig())
  mesh = parallel.make_mesh(1)
  rows = []
  for f in (int(x) for x in a.frames.split(",")):
    lh, lw = a.height // 8, a.width // 8
    den = parallel.make_denoiser(
      model, plan, temporal, mesh, latent_shape=(1, f, lh, lw, cfg.in_channels), frame_chunk=a.frame_chunk
    )
    ctx = parallel.replicate(np.zeros((1, 77, cfg.context_dim), np.float32), mesh)
    fps, seed = parallel.replicate(np.array([24], np.int32), mesh), parallel.replicate(np.int32(0), mesh)
    state = den.init(seed)
    t0 = time.perf_counter()
    lowered = den.step.lower(den.params, state, ctx, ctx, fps, seed)
    t1 = time.perf_counter()
    compiled = lowered.compile(opts or None)
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else None
    rows.append(
      {"frames": f, "frame_chunk": a.frame_chunk, "lower_s": t1 - t0, "compile_s": t2 - t1, "temp_bytes": temp}
    )
    print(f"F={f:5d} chunk={a.frame_chunk}: lower {t1 - t0:6.1f} s, compile {t2 - t1:6.1f} s, temp {temp}", flush=True)
    del compiled, lowered, den, state
  if a.json:
    meta = {
      "device": jax.devices()[0].device_kind,
      "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d"),
      "options": {k: str(v) for k, v in opts.items()},
      "cache_dir": a.cache_dir,
      "command": " ".join(sys.argv),
    }
    pathlib.Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
