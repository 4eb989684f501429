r"""Whole-UNet agreement check on GPU: this checkout's bf16 UNet against a float32 run and against another checkout.

  python -m benchmarks.step_check --save new.npz            # this checkout: bf16 eps and the float32 reference
  (cd ../old && python -m benchmarks.step_check --save old.npz --no_reference)   # another checkout, same inputs
  python -m benchmarks.step_check --compare new.npz old.npz [--json out.json]

One guided UNet call (both CFG branches, batch 2) of the full-size model with random weights (seeded: the
same weights in every checkout, drawn by ``pipeline.random_model``), 320x512, F frames on one device, dual-scope
attention, at a global-phase and a local-phase timestep. The float32 reference computes with the same
bf16-rounded weights in float32. Relative error is ``max|a - b| / max|b|`` per timestep, bounded by 1e-2 for
bf16 (``benchmarks.attention_check.BF16_TOL``): each bf16 version against float32, and the two bf16 versions
against each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

BF16_TOL = 1e-2  # as benchmarks/attention_check.py
TIMESTEPS = (999, 500)  # global phase (t >= 800) and local phase


def eps_of(frames: int, dtype: str, seed: int, preset_name: str = "videocrafter2"):
  from flax import nnx

  from vinf_jax import parallel, pipeline
  from vinf_jax.config import TemporalConfig, preset
  from vinf_jax.models import unet3d

  try:
    from vinf_jax.models import tame_residuals
  except ImportError:  # a checkout from before tame_residuals: the same rule, restated
    tame_residuals = _tame

  cfg = dataclasses.replace(preset(preset_name).unet, dtype="bfloat16", param_dtype="bfloat16")
  # small residual branches, as trained nets have: bf16 rounding is then not amplified chaotically
  model = tame_residuals(pipeline.random_model(unet3d.UNet3D, cfg, seed))
  if dtype == "float32":  # the same bf16-rounded weights, computed in float32
    cfg32 = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
    graphdef, _ = nnx.split(unet3d.abstract(cfg32))
    state = jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(model))
    model = nnx.merge(graphdef, state)
  small = preset_name != "videocrafter2"  # CPU smoke runs: a small latent, window and global set
  frame_ctx = parallel.FrameContext(
    TemporalConfig(attention="dual", window=2 if small else 8, num_global=4 if small else 16)
  )
  rng = np.random.default_rng(seed + 1)
  hw = (8, 8) if small else (40, 64)
  x = jnp.asarray(rng.standard_normal((2, frames, *hw, cfg.in_channels)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 77, cfg.context_dim)), jnp.float32)
  fps = jnp.asarray([24, 24], jnp.int32)
  graphdef, params = nnx.split(model)
  fn = jax.jit(lambda p, x, t, c, f: nnx.merge(graphdef, p)(x, t, c, f, frames=frame_ctx))
  return {f"t{t}": np.asarray(fn(params, x, jnp.full((2,), t, jnp.float32), ctx, fps)) for t in TIMESTEPS}


def _tame(model, scale: float = 0.2):
  from flax import nnx

  graphdef, state = nnx.split(model)

  def scaled(path, x):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    branch_out = any(s in names for s in ("out_conv", "proj_out", "conv4", "to_out")) or names[-2:-1] == ["out"]
    return x * scale if branch_out and names[-1] == "kernel" else x

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(scaled, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def rel_err(a, b) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--preset", default="videocrafter2", help="tiny: a CPU smoke run")
  ap.add_argument("--save", default="")
  ap.add_argument("--no_reference", action="store_true", help="bf16 only (no float32 run)")
  ap.add_argument("--compare", nargs=2, metavar=("NEW", "OLD"))
  ap.add_argument("--json", default="")
  a = ap.parse_args(argv)
  if a.compare:
    new, old = (dict(np.load(p)) for p in a.compare)
    out = {"bound": BF16_TOL, "rows": []}
    for t in TIMESTEPS:
      row = {"t": t, "new_vs_old": rel_err(new[f"bf16_t{t}"], old[f"bf16_t{t}"])}
      for name, d in (("new", new), ("old", old)):
        if f"f32_t{t}" in d:
          row[f"{name}_vs_f32"] = rel_err(d[f"bf16_t{t}"], d[f"f32_t{t}"])
      row["ok"] = all(v <= BF16_TOL for k, v in row.items() if k.endswith(("_old", "_f32")))
      out["rows"].append(row)
      print("  ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if a.json:
      pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
    return 0 if all(r["ok"] for r in out["rows"]) else 1
  t0 = time.perf_counter()
  res = {f"bf16_{k}": v for k, v in eps_of(a.frames, "bfloat16", a.seed, a.preset).items()}
  if not a.no_reference:
    res.update({f"f32_{k}": v for k, v in eps_of(a.frames, "float32", a.seed, a.preset).items()})
  np.savez(a.save, **res)
  print(f"saved {sorted(res)} to {a.save} in {time.perf_counter() - t0:.1f} s ({jax.devices()[0].device_kind})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
