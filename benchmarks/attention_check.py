r"""GPU check of the temporal attention's cuDNN path: agreement with the XLA path and a float32 reference, and time.

  python -m benchmarks.attention_check [--json out.json]

At the UNet's real shapes (batch 2, 40x64 latent = 2,560 positions with 5 heads of 64, and the 16x wider
levels' 160 positions with 20 heads), one device, bfloat16 inputs: ``dual_scope_attention`` and
``full_temporal_attention`` with ``implementation='cudnn'`` against the same function with 'xla' and
against the XLA path in float32 on the same (bf16-rounded) inputs. Relative error is
``max|a - b| / max|b|``; bf16 attention lands near 1e-2 of the float32 result at most (the bound the
project uses for bf16, fixed before the run). Both t phases (global phase t >= 800, local phase below)
and both ``video_ends`` modes are covered. Also the median time of each path. CPU: exits with a note.
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

from vinf_jax.config import TemporalConfig
from vinf_jax.layers import attention as att
from vinf_jax.parallel import FrameContext

BF16_TOL = 1e-2  # bf16 inputs and probabilities: ~3 significant digits


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def median_ms(fn, *args, reps: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(ts))


def check(
  frames: int, positions: int, heads: int, mode: str, ends: str, t: float, seed: int, fast: str = "cudnn"
) -> dict:
  """One case: ``fast`` (the implementation under test) against XLA in bf16 and in float32."""
  cfg = TemporalConfig(attention=mode, window=8, num_global=16, video_ends=ends)
  ctx = FrameContext(cfg)
  rng = np.random.default_rng(seed)
  shape = (2, frames, positions, heads, 64)
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16) for _ in range(3))
  tt = jnp.full((2,), t, jnp.float32)

  def fn(impl):
    return jax.jit(lambda q, k, v, tt: att.temporal_attention(q, k, v, tt, ctx, implementation=impl))

  cudnn, xla = fn(fast), fn("xla")
  o_cudnn = cudnn(q, k, v, tt)
  o_xla = xla(q, k, v, tt)
  o_ref = xla(*(x.astype(jnp.float32) for x in (q, k, v)), tt)
  rec = {
    "frames": frames,
    "positions": positions,
    "heads": heads,
    "attention": mode,
    "video_ends": ends,
    "t": t,
    "err_cudnn_vs_f32": rel_err(o_cudnn, o_ref),
    "err_xla_vs_f32": rel_err(o_xla, o_ref),
    "err_cudnn_vs_xla": rel_err(o_cudnn, o_xla),
    "finite": bool(np.isfinite(np.asarray(o_cudnn, np.float32)).all()),
    "ms_cudnn": median_ms(cudnn, q, k, v, tt),
    "ms_xla": median_ms(xla, q, k, v, tt),
  }
  rec["ok"] = rec["finite"] and rec["err_cudnn_vs_f32"] <= BF16_TOL
  return rec


def check_kernel(frames: int, positions: int, heads: int, ends: str, t: float, seed: int) -> dict:
  """The Pallas window kernel (``dual_scope_attention_kernel``) against XLA in float32, timed against cuDNN's
  fused attention on the same call (the blocked keys; and the zero-key form where one device holds one block)."""
  cfg = TemporalConfig(attention="dual", window=8, num_global=16, video_ends=ends)
  ctx = FrameContext(cfg)
  rng = np.random.default_rng(seed)
  shape = (2, frames, positions, heads, 64)
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16) for _ in range(3))
  tt = jnp.full((2,), t, jnp.float32)
  kern = jax.jit(lambda q, k, v, tt: att.dual_scope_attention_kernel(q, k, v, tt, ctx))
  blocked = jax.jit(lambda q, k, v, tt: att.dual_scope_attention(q, k, v, tt, ctx, implementation="cudnn"))
  ref = jax.jit(lambda q, k, v, tt: att.dual_scope_attention(q, k, v, tt, ctx, implementation="xla"))
  o = kern(q, k, v, tt)
  o_ref = ref(*(x.astype(jnp.float32) for x in (q, k, v)), tt)
  rec = {
    "kernel": att.window_kernel_plan(ctx, frames, 64),
    "frames": frames,
    "positions": positions,
    "heads": heads,
    "video_ends": ends,
    "t": t,
    "err_kernel_vs_f32": rel_err(o, o_ref),
    "err_cudnn_vs_f32": rel_err(blocked(q, k, v, tt), o_ref),
    "finite": bool(np.isfinite(np.asarray(o, np.float32)).all()),
    "ms_kernel": median_ms(kern, q, k, v, tt),
    "ms_cudnn": median_ms(blocked, q, k, v, tt),
    # the bytes of Q, K, V read once and O written once: the kernel's floor
    "min_bytes": 4 * int(np.prod(shape)) * 2,
  }
  if att.uses_zero_key(ctx, frames):
    z = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
    zk = jax.jit(lambda q, k, v, tt: att.dual_scope_attention_zero_key(q, k, v, tt, ctx, implementation="cudnn"))
    rec["ms_cudnn_zero_key"] = median_ms(zk, q, z(k), z(v), tt)  # K/V with their zero frame made beforehand
  rec["ok"] = rec["finite"] and rec["err_kernel_vs_f32"] <= BF16_TOL
  return rec


SWEEP_CASES = [  # (frames, positions, heads): level 0 and 2 at F=64 (merged), 256 frames and a 1,152-frame chunk
  (64, 2560, 5),
  (64, 160, 20),
  (256, 160, 20),
  (1152, 144, 5),
]


def sweep_kernel(seed: int = 0) -> dict:
  """The window kernel's time per form for each (problems a program, warps) of ``kernels.WINDOW_TUNING``'s
  range, at the local phase (t 300, the 29 of 30 steps that are not global), video ends 'zeros'; -> the
  records and the fastest setting per form by the sum of its cases' times."""
  from vinf_jax.layers import kernels

  cfg = TemporalConfig(attention="dual", window=8, num_global=16, video_ends="zeros")
  ctx = FrameContext(cfg)
  saved, recs, totals = dict(kernels.WINDOW_TUNING), [], {}
  try:
    for frames, positions, heads in SWEEP_CASES:
      form = att.window_kernel_plan(ctx, frames, 64)
      rng = np.random.default_rng(seed)
      shape = (2, frames, positions, heads, 64)
      q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16) for _ in range(3))
      tt = jnp.full((2,), 300.0, jnp.float32)
      for nh in (1, 2, 4, 8):
        for warps in (2, 4, 8):
          kernels.WINDOW_TUNING[form] = (nh, warps)
          fn = jax.jit(lambda q, k, v, tt: att.dual_scope_attention_kernel(q, k, v, tt, ctx))
          try:
            ms = median_ms(fn, q, k, v, tt)
          except Exception as err:  # noqa: BLE001 - a setting that does not compile is a result
            print(f"{(frames, positions, heads)} {form} heads {nh} warps {warps}: ERROR {str(err)[:200]}", flush=True)
            continue
          rec = dict(frames=frames, positions=positions, heads=heads, form=form, per_program=nh, warps=warps)
          recs.append(rec | {"ms": ms})
          totals.setdefault(form, {}).setdefault((nh, warps), []).append(ms)
          print(f"{(frames, positions, heads)} {form} heads {nh} warps {warps}: {ms:.3f} ms", flush=True)
  finally:
    kernels.WINDOW_TUNING.clear()
    kernels.WINDOW_TUNING.update(saved)
  n_cases = {f: max(len(v) for v in t.values()) for f, t in totals.items()}
  best = {f: min((s for s, v in t.items() if len(v) == n_cases[f]), key=lambda s: sum(t[s])) for f, t in totals.items()}
  return {"cases": recs, "best": {f: list(s) for f, s in best.items()}}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json", default="")
  ap.add_argument("--window_kernel", action="store_true", help="check and time the Pallas window kernel instead")
  ap.add_argument(
    "--window_sweep",
    action="store_true",
    help="time the window kernel per (problems a program, warps) and print the fastest per form as "
    "bench_step's --window_tuning value",
  )
  a = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("attention_check: no GPU (cuDNN's fused attention runs on GPUs only); nothing to check")
    return 0
  if a.window_sweep:
    out = sweep_kernel()
    out.update(device_kind=jax.devices()[0].device_kind, jax=jax.__version__)
    if a.json:
      pathlib.Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print("window_tuning:", ",".join(f"{f}={nh}:{w}" for f, (nh, w) in sorted(out["best"].items())))
    return 0
  cases = [
    (64, 2560, 5, "dual", "zeros", 900.0),
    (64, 2560, 5, "dual", "zeros", 300.0),
    (64, 2560, 5, "dual", "mask", 300.0),
    (256, 160, 20, "dual", "zeros", 900.0),  # four query blocks
    (256, 160, 20, "dual", "mask", 300.0),
    (64, 640, 10, "full", "zeros", 900.0),
  ]
  fn = check
  if a.window_kernel:
    fn = check_kernel
    cases = [
      (64, 2560, 5, "zeros", 900.0),  # level 0, one block: the 'merged' plan
      (64, 2560, 5, "zeros", 300.0),
      (64, 2560, 5, "mask", 300.0),
      (64, 160, 20, "zeros", 300.0),  # level 2
      (256, 160, 20, "zeros", 900.0),  # four query blocks: 'blocked'
      (256, 160, 20, "mask", 300.0),
      (1152, 144, 5, "zeros", 300.0),  # one chunk of positions of the 1,152-frame video (--frame_chunk 64)
      (1152, 143, 5, "zeros", 300.0),  # the same with an odd number of problems (one head a program)
    ]
  recs = []
  for i, c in enumerate(cases):
    try:
      r = fn(*c, seed=i)
    except Exception as err:  # noqa: BLE001 - a failing case is a result
      names = ("frames", "positions", "heads") + (() if a.window_kernel else ("attention",)) + ("video_ends", "t")
      r = dict(zip(names, c, strict=True))
      r.update(ok=False, error=f"{type(err).__name__}: {err}"[:1500])
    recs.append(r)
    if "error" in r:
      print(f"{c}: ERROR {r['error'][:400]}", flush=True)
    elif a.window_kernel:
      zk = f", cudnn zero-key {r['ms_cudnn_zero_key']:.3f}" if "ms_cudnn_zero_key" in r else ""
      print(
        f"{c} {r['kernel']}: kernel vs f32 {r['err_kernel_vs_f32']:.2e} (cudnn {r['err_cudnn_vs_f32']:.2e}); "
        f"{r['ms_kernel']:.3f} ms kernel ({r['min_bytes'] / r['ms_kernel'] / 1e9:.2f} TB/s), {r['ms_cudnn']:.3f} "
        f"cudnn blocked{zk} {'ok' if r['ok'] else 'FAIL'}",
        flush=True,
      )
    else:
      print(
        f"{c}: cudnn vs f32 {r['err_cudnn_vs_f32']:.2e}, xla(bf16) vs f32 {r['err_xla_vs_f32']:.2e}, "
        f"cudnn vs xla {r['err_cudnn_vs_xla']:.2e}; {r['ms_cudnn']:.3f} ms cudnn, {r['ms_xla']:.3f} ms xla "
        f"{'ok' if r['ok'] else 'FAIL'}",
        flush=True,
      )
  out = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "tol": BF16_TOL, "cases": recs}
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
  ok = all(r["ok"] for r in recs)
  print("attention_check:", "all ok" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
