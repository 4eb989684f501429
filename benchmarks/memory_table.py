r"""Refresh the memory plan's table (vinf_jax/pipeline/memory_table.json) from XLA's plans of the real programs.

  python -m benchmarks.memory_table --model videocrafter2 --dtypes bfloat16,float16 [--kinds guided,turbo]
  python -m benchmarks.memory_table --model tiny --dtypes float32 --height 128 --width 128   # CPU

For each dtype and step kind it compiles (on one device, abstract weights: nothing is allocated, nothing
runs) the sampling step of :func:`vinf_jax.parallel.make_denoiser` at (F, frame_chunk) = (16, 0), (64, 0)
unchunked and (64, 16), (128, 16), (64, 8), (128, 8) chunked, and the decoder of :func:`vinf_jax.pipeline.make_decoder`
at (F, decode_chunk) = (16, 4), (16, 8), (64, 8); reads ``memory_analysis()`` of each (temporaries; for the
decoder also its output); fits the linear models of :mod:`vinf_jax.pipeline.memory`; and checks each on one
more point ((32, 0) and (64, 4)), printing fit / XLA. ``--write`` merges the entries into the table
with their card, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import numpy as np

# (local frames, frame_chunk) fitted, then one more point checked. Unchunked and chunked steps are different
# programs (the chunked one maps the per-frame layers over chunks): each has its own linear model.
STEP_UNCHUNKED, STEP_UNCHUNKED_CHECK = ((16, 0), (64, 0)), (32, 0)
# Chunked: two lines (see vinf_jax/pipeline/memory.py) from a larger and a smaller chunk at two frame counts.
STEP_CHUNKED = ((64, 16), (128, 16), (64, 8), (128, 8))
DECODE_POINTS, DECODE_CHECK = ((16, 4), (16, 8), (64, 8)), (64, 4)


def _model(name: str, dtype: str, kind: str):
  from vinf_jax.config import preset

  if kind == "turbo" and "turbo" not in name:
    name = f"{name}_turbo"
  return preset(name).with_dtype(dtype)


def step_temp(model, frames: int, chunk: int, height: int, width: int, kind: str) -> int:
  """XLA's temporary bytes of the step for ``frames`` local frames on one device."""
  import jax
  import jax.numpy as jnp

  from vinf_jax import parallel, sampling
  from vinf_jax.config import TemporalConfig
  from vinf_jax.models import unet3d

  mesh = parallel.make_mesh(1)
  down = model.vae.downsample_factor
  shape = (1, frames, height // down, width // down, model.unet.in_channels)
  sampler = sampling.SamplerConfig(name="turbo", steps=4) if kind == "turbo" else sampling.SamplerConfig()
  temporal = TemporalConfig(attention="dual", window=min(8, frames // 2), num_global=min(16, frames))
  den = parallel.make_denoiser(
    unet3d.abstract(model.unet), sampling.make_plan(sampler), temporal, mesh, latent_shape=shape, frame_chunk=chunk
  )
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  state = jax.eval_shape(den.init, seed)
  ctx = jax.ShapeDtypeStruct((1, model.text.context_length, model.unet.context_dim), jnp.float32, sharding=rep)
  fps = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rep)
  compiled = den.step.lower(den.params, state, ctx, ctx, fps, seed).compile(parallel.compiler_options(1))
  return int(compiled.memory_analysis().temp_size_in_bytes)


def decode_temp(model, frames: int, chunk: int, height: int, width: int) -> int:
  """XLA's temporary plus output bytes of the decoder for ``frames`` local frames on one device."""
  import jax
  import jax.numpy as jnp

  from vinf_jax import parallel
  from vinf_jax.models import vae
  from vinf_jax.pipeline import make_decoder

  mesh = parallel.make_mesh(1)
  down = model.vae.downsample_factor
  frames_sh = jax.sharding.NamedSharding(mesh, parallel.frames_spec())
  x = jax.ShapeDtypeStruct((1, frames, height // down, width // down, 4), jnp.float32, sharding=frames_sh)
  params, fn = make_decoder(vae.abstract(model.vae), mesh, chunk)  # all frames in one piece
  start = jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  ma = fn.lower(params, x, start).compile(parallel.compiler_options(1)).memory_analysis()
  return int(ma.temp_size_in_bytes + ma.output_size_in_bytes)


def fit(points: list[tuple[int, int, int]], columns) -> dict:
  """Least squares of ``bytes`` over (F, chunk, bytes) points with the given named columns of (F, chunk)."""
  a = np.array([[1.0] + [col(f, c) for col in columns.values()] for f, c, _ in points])
  b = np.array([t for _, _, t in points], np.float64)
  coef, *_ = np.linalg.lstsq(a, b, rcond=None)
  return {"fixed": float(coef[0])} | {name: float(v) for name, v in zip(columns, coef[1:], strict=True)}


def predict(c: dict, f: int, chunk: int) -> float:
  return c["fixed"] + c["per_frame"] * f + c.get("per_chunk_frame", 0.0) * chunk


def _fitted(rows: list[tuple[int, int, int]], columns, label: str, log) -> dict:
  """The fit of all rows but the last, checked on the last."""
  model = fit(rows[:-1], columns)
  f, c, got = rows[-1]
  model["check"] = {"frames": f, "chunk": c, "xla": got, "fit": predict(model, f, min(f, c)), "points": rows}
  log(f"  {label} check F={f} chunk={c}: fit / XLA = {model['check']['fit'] / got:.3f}")
  return model


def measure_entry(name: str, dtype: str, kind: str, height: int, width: int, workers: int = 1, log=print) -> dict:
  """The table entry of one model, dtype and step kind; ``workers`` compiles at a time (XLA compiles on the
  host's cores; the plans do not depend on what else compiles)."""
  from concurrent.futures import ThreadPoolExecutor

  model = _model(name, dtype, kind)
  label = f"{name} {dtype} {kind}"
  tasks = {
    "step_unchunked": (*STEP_UNCHUNKED, STEP_UNCHUNKED_CHECK),
    "step_chunked": STEP_CHUNKED,
    "decode": (*DECODE_POINTS, DECODE_CHECK),
  }

  def one(what: str, f: int, c: int) -> tuple[int, int, int]:
    t0 = time.perf_counter()
    if what == "decode":
      b = decode_temp(model, f, c, height, width)
    else:
      b = step_temp(model, f, c, height, width, kind)
    log(f"{label} {what} F={f} chunk={c}: {b / 2**30:.4f} GiB ({time.perf_counter() - t0:.0f} s)")
    return f, c, b

  with ThreadPoolExecutor(max(1, workers)) as pool:
    futures = {w: [pool.submit(one, w, f, c) for f, c in pts] for w, pts in tasks.items()}
    rows = {w: [fu.result() for fu in fs] for w, fs in futures.items()}
  per_frame = {"per_frame": lambda f, c: f}
  chunked = per_frame | {"per_chunk_frame": lambda f, c: min(f, c)}
  down = model.vae.downsample_factor
  unchunked = _fitted(rows["step_unchunked"], per_frame, f"{label} step", log)
  return {
    "latent_hw": [height // down, width // down],
    "step_unchunked": unchunked,
    "step_chunked": fit_chunked(rows["step_chunked"], unchunked["per_frame"]),
    "decode": _fitted(rows["decode"], chunked, f"{label} decode", log),
  }


def fit_chunked(rows: list[tuple[int, int, int]], unchunked_per_frame: float) -> dict:
  """The chunked step's two lines from (F1, C_hi), (F2, C_hi), (F1, C_lo), (F2, C_lo): the temporal layers'
  line through the small-chunk points (there the whole clip's temporal activations are the peak), and the
  per-frame layers' line: its slope in F through the large-chunk points, and per chunk frame what a frame in
  flight costs the unchunked program less that slope."""
  (f1, hi, a1), (f2, _, a2), (_, lo, b1), (_, _, b2) = rows
  t_pf = (b2 - b1) / (f2 - f1)
  c_pf = (a2 - a1) / (f2 - f1)
  c_pc = max(0.0, unchunked_per_frame - c_pf)
  return {
    "chunk_line": {"fixed": a1 - c_pf * f1 - c_pc * hi, "per_frame": c_pf, "per_chunk_frame": c_pc},
    "temporal_line": {"fixed": b1 - t_pf * f1, "per_frame": t_pf},
    "points": rows,
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="videocrafter2")
  p.add_argument("--dtypes", default="bfloat16,float16")
  p.add_argument("--kinds", default="guided,turbo")
  p.add_argument("--height", type=int, default=320)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--workers", type=int, default=1, help="compiles at a time")
  p.add_argument("--write", action="store_true", help="merge the entries into the package's table")
  p.add_argument("--out", default="", help="also write the entries as JSON here")
  a = p.parse_args(argv)
  import jax

  from vinf_jax.pipeline import memory

  card, day = jax.devices()[0].device_kind, datetime.date.today().isoformat()
  source = f"{card}, {day}, jax {jax.__version__}: python -m benchmarks.memory_table {' '.join(sys.argv[1:])}"
  out = {}
  for dtype in a.dtypes.split(","):
    for kind in a.kinds.split(","):
      e = measure_entry(a.model, dtype, kind, a.height, a.width, a.workers)
      out.setdefault(dtype, {})[kind] = dict(e, source=source)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=1)
  if a.write:
    table = json.loads(open(memory.TABLE_PATH).read())
    for dtype, kinds in out.items():
      table["entries"].setdefault(a.model, {}).setdefault(dtype, {}).update(kinds)
    with open(memory.TABLE_PATH, "w") as f:
      json.dump(table, f, indent=1)
      f.write("\n")
  return out


if __name__ == "__main__":
  main()
