r"""Time the step's memory-bound pieces one by one at the full-size UNet's shapes: GroupNorm, GEGLU, the FF.

  python -m benchmarks.kernel_probe [--json out.json] [--frames 64] [--only gn,geglu,ff]

Each case is one jitted function at a real shape of one guided step (batch 2 = both CFG branches, 320x512:
the level-0 activations are [2, F, 40, 64, 320]); its median time over ``--reps`` calls (dispatched back to
back, then waited for) and the bytes it must move at least (each input read once, each output written once)
give an achieved bandwidth to hold against a plain elementwise pass (``copy``: read x, write x + 1). Several
variants of one piece run side by side, so the fastest formulation can be picked with numbers. CPU: a smoke
run at small shapes (the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from vinf_jax.layers import kernels
from vinf_jax.layers import norm as norm_lib


def timed_ms(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(3):
    t0 = time.perf_counter()
    out = [fn(*args) for _ in range(reps)]
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / reps)
    del out
  return 1e3 * float(np.median(ts))


def nbytes(*arrays) -> int:
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)


def record(rows, name, fn, args, out_bytes, reps, compile_options=None):
  try:
    f = jax.jit(fn)
    if compile_options:
      f = f.lower(*args).compile(compile_options)
    ms = timed_ms(f, *args, reps=reps)
    moved = nbytes(*args) + out_bytes
    rows.append({"case": name, "ms": ms, "bytes": moved, "GB_per_s": moved / ms / 1e6})
  except Exception as err:  # noqa: BLE001 - a variant that does not compile is a result
    rows.append({"case": name, "error": f"{type(err).__name__}: {err}"[:400]})
  r = rows[-1]
  print(f"{name:<58}" + (f"{r['ms']:9.3f} ms {r['GB_per_s']:8.0f} GB/s" if "ms" in r else r["error"]), flush=True)


def gn_apply(stats_fn, x, groups, axes, eps):
  mean, var = stats_fn(x, groups, axes)
  c = x.shape[-1]
  xg = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, c // groups)
  y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  scale = jnp.linspace(0.5, 1.5, c, dtype=jnp.float32)
  return jax.nn.silu(y * scale + 0.1).astype(x.dtype)


def geglu_split(y):
  a, g = jnp.split(y, 2, axis=-1)
  return a * jax.nn.gelu(g, approximate=False)


def geglu_f32(y):
  a, g = jnp.split(y.astype(jnp.float32), 2, axis=-1)
  return (a * jax.nn.gelu(g, approximate=False)).astype(y.dtype)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--frames", type=int, default=64)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--only", default="copy,gn,geglu,ff")
  ap.add_argument("--json", default="")
  a = ap.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  f, (lh, lw) = (a.frames, (40, 64)) if gpu else (2, (8, 8))
  dt = jnp.bfloat16 if gpu else jnp.float32
  rng = np.random.default_rng(0)
  rows: list[dict] = []
  only = set(a.only.split(","))
  # (level, channels, latent h, latent w)
  levels = [(0, 320, lh, lw), (1, 640, lh // 2, lw // 2)]
  if gpu:
    levels.insert(1, (0, 640, lh, lw))  # a level-0 decoder ResBlock's input (h and its skip)

  if "copy" in only:
    x = jnp.asarray(rng.standard_normal((2, f, lh, lw, 320)), dt)
    record(rows, "copy x+1 (level-0 activation)", lambda x: x + 1, (x,), nbytes(x), a.reps)

  if "gn" in only:
    for lvl, c, h, w in levels:
      x = jnp.asarray(rng.standard_normal((2, f, h, w, c)) * 2 + 0.5, dt)
      for axes, scope in (((2, 3), "per-frame"), ((1, 2, 3), "clip")):
        for stats_name, stats in (("two-pass", norm_lib.group_stats_two_pass), ("one-pass", norm_lib.group_stats)):
          tag = f"gn L{lvl} C{c} {scope} {stats_name}"
          record(rows, tag + " stats", lambda x, s=stats, ax=axes: s(x, 32, ax), (x,), 0, a.reps)
          record(
            rows,
            tag + " stats+apply+silu",
            lambda x, s=stats, ax=axes: gn_apply(s, x, 32, ax, 1e-5),
            (x,),
            nbytes(x),
            a.reps,
          )

  if "geglu" in only or "ff" in only:
    for lvl, c, h, w in levels:
      if lvl == 0 and c == 640:
        continue
      n = 2 * f * h * w
      inner = 4 * c
      if "geglu" in only:
        y = jnp.asarray(rng.standard_normal((n, 2 * inner)), dt)
        out = n * inner * jnp.dtype(dt).itemsize
        record(rows, f"geglu L{lvl} split, gelu in {jnp.dtype(dt).name}", geglu_split, (y,), out, a.reps)
        record(rows, f"geglu L{lvl} split, float32", geglu_f32, (y,), out, a.reps)
        ya, yg = y[:, :inner], y[:, inner:]
        record(
          rows, f"geglu L{lvl} two inputs", lambda p, q: p * jax.nn.gelu(q, approximate=False), (ya, yg), out, a.reps
        )
        yi = y.reshape(n, inner, 2)
        record(
          rows,
          f"geglu L{lvl} interleaved",
          lambda v: v[..., 0] * jax.nn.gelu(v[..., 1], approximate=False),
          (yi,),
          out,
          a.reps,
        )
        for br in (16, 32, 64):
          record(
            rows,
            f"geglu L{lvl} pallas (triton) rows {br}",
            lambda v, br=br: kernels._geglu_pallas(v, block_rows=br, interpret=not gpu),
            (y,),
            out,
            a.reps,
          )
        record(
          rows,
          f"geglu L{lvl} split, tanh gelu (info)",
          lambda v: (lambda p, q: p * jax.nn.gelu(q))(*jnp.split(v, 2, -1)),
          (y,),
          out,
          a.reps,
        )
      if "ff" in only:
        x = jnp.asarray(rng.standard_normal((n, c)), dt)
        w1 = jnp.asarray(rng.standard_normal((c, 2 * inner)) / math.sqrt(c), dt)
        w2 = jnp.asarray(rng.standard_normal((inner, c)) / math.sqrt(inner), dt)
        out = nbytes(x)

        def ff(x, w1, w2):
          return geglu_split(x @ w1) @ w2

        def ff_two(x, w1, w2, inner=inner):
          return ((x @ w1[:, :inner]) * jax.nn.gelu(x @ w1[:, inner:], approximate=False)) @ w2

        def ff_pallas(x, w1, w2):
          return kernels.geglu(x @ w1, impl="pallas", interpret=not gpu) @ w2

        record(
          rows,
          f"ff L{lvl} one proj, pallas geglu, cublas",
          ff_pallas,
          (x, w1, w2),
          out,
          a.reps,
          {"xla_gpu_enable_triton_gemm": False} if gpu else None,
        )
        for opts_name, opts in (("cublas", {"xla_gpu_enable_triton_gemm": False}), ("triton", {})):
          if not gpu:
            opts = None
          record(rows, f"ff L{lvl} one proj, {opts_name}", ff, (x, w1, w2), out, a.reps, opts)
          record(rows, f"ff L{lvl} two projs, {opts_name}", ff_two, (x, w1, w2), out, a.reps, opts)
          if not gpu:
            break
  if a.json:
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    pathlib.Path(a.json).write_text(json.dumps({"meta": meta, "frames": f, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
