r"""XLA's memory plan of one guided UNet pass (batch 2) per (local frames, frame_chunk): compile only, no run.

  python -m benchmarks.unet_memory --frames 256,1152 --chunks 0,16 [--preset videocrafter2] [--out mem.json]

For each pair it compiles the forward on the first device (abstract weights: nothing is allocated) and
prints XLA's temporary buffer size (the activations), the argument size (weights + inputs) and the
temporary memory per frame, which is what ``--frame_chunk`` is meant to bound. Dual-scope attention
(P=8, G=16), bfloat16, 320x512 unless told otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time


def measure(preset: str, frames: int, chunk: int, height: int, width: int, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp

  from vinf_jax.config import TemporalConfig
  from vinf_jax.config import preset as get_preset
  from vinf_jax.models import unet3d
  from vinf_jax.parallel import FrameContext

  model = get_preset(preset)
  cfg = dataclasses.replace(model.unet, dtype=dtype, param_dtype=dtype)
  ctx = FrameContext(TemporalConfig(attention="dual", window=8, num_global=16))
  f = model.vae.downsample_factor
  x = jax.ShapeDtypeStruct((2, frames, height // f, width // f, cfg.in_channels), jnp.dtype(dtype))
  text = jax.ShapeDtypeStruct((2, 77, cfg.context_dim), jnp.dtype(dtype))
  t, fps = jnp.array([900.0, 900.0]), jnp.array([24.0, 24.0])
  fwd = jax.jit(lambda m, x, c: m(x, t, c, fps, frames=ctx, frame_chunk=chunk))
  t0 = time.perf_counter()
  compiled = fwd.lower(unet3d.abstract(cfg), x, text).compile()
  ma = compiled.memory_analysis()
  return {
    "frames": frames,
    "frame_chunk": chunk,
    "temp_GiB": ma.temp_size_in_bytes / 2**30,
    "args_GiB": ma.argument_size_in_bytes / 2**30,
    "temp_MiB_per_frame": ma.temp_size_in_bytes / frames / 2**20,
    "compile_s": time.perf_counter() - t0,
    "device": jax.devices()[0].device_kind,
  }


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="videocrafter2")
  p.add_argument("--frames", default="256,1152", help="local frame counts, comma-separated")
  p.add_argument("--chunks", default="0,16", help="frame_chunk values, comma-separated")
  p.add_argument("--height", type=int, default=320)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  rows = []
  for n in map(int, a.frames.split(",")):
    for c in map(int, a.chunks.split(",")):
      r = measure(a.preset, n, c, a.height, a.width, a.dtype)
      rows.append(r)
      print(
        f"T={n:5d} chunk={c:3d}: temp {r['temp_GiB']:7.2f} GiB ({r['temp_MiB_per_frame']:6.1f} MiB/frame), "
        f"args {r['args_GiB']:.2f} GiB, compile {r['compile_s']:.0f} s  [{r['device']}]",
        flush=True,
      )
      if a.out:
        with open(a.out, "w") as f:
          json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
