r"""fp8 (``--precision=fp8``) against bf16 on one GPU: ms per frame-step, and the error of the final latents.

  python -m benchmarks.fp8_check --out $OUT/fp8_check.json                  # one H100/H200 (benchmarks/gpu/fp8_1gpu.sh)
  python -m benchmarks.fp8_check --model tiny --shrink --frames 8 --ref_frames 8 --height 64 --width 64 --window 2 \
      --num_global 4 --guided_steps 1 --turbo_steps 1 --parts speed,turbo --out /tmp/fp8.json   # CPU smoke (tests)

Full-size VideoCrafter2 (and its T2V-Turbo variant) with random weights, drawn once per model in bfloat16
(``pipeline.random_model``, residual branches tamed as ``benchmarks/step_check.py`` does: a well-conditioned random
network, whose rounding is not amplified chaotically), one device, dual-scope attention:

1. speed: the guided step (both CFG branches, DPM-Solver++ SDE) at ``--frames`` (64) at 320x512 in bf16 and in fp8,
   median of every step of a 30-step run after the first (ms per frame-step = step / F); the count of cuBLASLt fp8
   GEMMs in the compiled fp8 step (0: XLA did not rewrite the fp8 dots, the speed is not fp8's);
2. error of the final latents after ``--guided_steps`` (30) guided steps: fp8 against bf16 at ``--frames`` (from
   the same runs), and float32 / bf16 / fp8 at ``--ref_frames`` (16: the float32 run, with float32 matmuls at
   'highest' precision, is kept small so the call fits its time; the 16-frame figures are the ones where bf16
   against float32 stands next to fp8 against bf16);
3. the same after ``--turbo_steps`` (4) T2V-Turbo steps (one UNet call a step) at ``--ref_frames``.

Same seed everywhere: the same x_T and per-step noise (drawn per global frame index), the same bf16-rounded weights
(float32 computes with them cast up; fp8 quantises them once at load time, ``unet3d.with_precision``). Errors:
``max|a - b| / max|b|`` and ``||a - b|| / ||b||`` over the latents. Every part fails soft (its error is recorded)
and the JSON is rewritten after each part, so a run cut off by its time limit keeps what it measured. Random
weights only: quality on real weights is not measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import traceback

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

FP8_GEMM = "__cublas$lt$matmul$f8"
PRECISIONS = ("float32", "bfloat16", "fp8")
TEXT_TOKENS, FPS = 77, 24


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="videocrafter2", help="preset; its _turbo variant runs the turbo part")
  ap.add_argument("--frames", type=int, default=64, help="frames of the speed runs (one device)")
  ap.add_argument("--ref_frames", type=int, default=16, help="frames of the float32 / bf16 / fp8 error runs")
  ap.add_argument("--height", type=int, default=320)
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--window", type=int, default=8)
  ap.add_argument("--num_global", type=int, default=16)
  ap.add_argument("--guided_steps", type=int, default=30)
  ap.add_argument("--turbo_steps", type=int, default=4)
  ap.add_argument("--timed", type=int, default=29, help="steps of the speed runs timed (after the first)")
  ap.add_argument("--parts", default="speed,guided,turbo")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--budget_s", type=float, default=450.0, help="start no part after this many seconds")
  ap.add_argument("--out", default="fp8_check.json")
  ap.add_argument(
    "--shrink",
    action="store_true",
    help="CPU smoke runs: the preset cut to two levels of one ResBlock (every layer kind)",
  )
  return ap.parse_args(argv[1:] if argv else [])


def rel_errors(a: np.ndarray, b: np.ndarray) -> dict:
  d = a.astype(np.float64) - b.astype(np.float64)
  return {
    "max_rel": float(np.max(np.abs(d)) / np.max(np.abs(b))),
    "rms_rel": float(np.linalg.norm(d) / np.linalg.norm(b)),
  }


def models_of(name: str, seed: int, shrink: bool = False) -> dict:
  """{'bfloat16', 'float32', 'fp8'}: one set of random bf16 weights (tamed), computed three ways, on the device."""
  from flax import nnx

  from vinf_jax import pipeline
  from vinf_jax.config import preset
  from vinf_jax.models import tame_residuals, unet3d

  cfg = dataclasses.replace(preset(name).unet, dtype="bfloat16", param_dtype="bfloat16")
  if shrink:
    cfg = dataclasses.replace(cfg, channel_mult=cfg.channel_mult[:2], num_res_blocks=1, attention_levels=(0, 1))
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  bf16 = tame_residuals(pipeline.random_model(unet3d.UNet3D, cfg, seed, sharding=dev))
  cfg32 = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
  graphdef, _ = nnx.split(unet3d.abstract(cfg32))
  f32 = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(np.float32), nnx.state(bf16)))
  return {"bfloat16": bf16, "float32": f32, "fp8": unet3d.with_precision(bf16, "fp8")}


def sample(model, sampler: str, steps: int, frames: int, a, *, hlo: bool = False) -> dict:
  """Compile the step of ``model`` for ``frames`` frames, run the plan's steps; times, final latents, fp8 GEMMs."""
  from vinf_jax import parallel, sampling
  from vinf_jax.config import TemporalConfig

  turbo = sampler == "turbo"
  plan = sampling.make_plan(sampling.SamplerConfig(name=sampler, steps=steps, guidance=7.5 if turbo else 12.0))
  temporal = TemporalConfig(attention="dual", window=a.window, num_global=a.num_global)
  mesh = parallel.make_mesh(1)
  lh, lw = a.height // 8, a.width // 8
  den = parallel.make_denoiser(model, plan, temporal, mesh, latent_shape=(1, frames, lh, lw, model.cfg.in_channels))
  rng = np.random.default_rng(a.seed)
  ctx = [rng.standard_normal((1, TEXT_TOKENS, model.cfg.context_dim), dtype=np.float32) for _ in range(2)]
  inputs = tuple(parallel.replicate(x, mesh) for x in (*ctx, np.array([FPS], np.int32), np.int32(a.seed)))
  state = den.init(inputs[-1])
  t0 = time.perf_counter()
  if model.cfg.dtype == "float32":  # the reference: float32 matmuls, not TF32
    with jax.default_matmul_precision("highest"):
      lowered = den.step.lower(den.params, state, *inputs)
  else:
    lowered = den.step.lower(den.params, state, *inputs)
  compiled = lowered.compile(compiler_options=parallel.compiler_options(1) or None)
  rec = {"frames": frames, "sampler": sampler, "steps": den.num_steps, "compile_s": time.perf_counter() - t0}
  if hlo:
    text = compiled.as_text()
    rec["fp8_gemms"] = text.count(FP8_GEMM)
    rec["cublas_gemms"] = text.count("__cublas$")
  ts = []
  for _ in range(den.num_steps):
    t0 = time.perf_counter()
    state = jax.block_until_ready(compiled(den.params, state, *inputs))
    ts.append(time.perf_counter() - t0)
  rec["step_ms_all"] = [1e3 * t for t in ts]
  timed = rec["step_ms_all"][1 : 1 + a.timed] or rec["step_ms_all"]
  rec["ms_per_step"] = float(np.median(timed))
  rec["ms_per_frame_step"] = rec["ms_per_step"] / frames
  rec["latents"] = np.asarray(jax.device_get(state.x), np.float32)
  rec["finite"] = bool(np.isfinite(rec["latents"]).all())
  return rec


def errors_at(res: dict, key: str, runs: dict) -> None:
  """fp8 vs bf16, bf16 vs float32 (and fp8 vs float32) of the runs that finished."""
  lat = {p: r["latents"] for p, r in runs.items() if "latents" in r}
  pairs = (("fp8_vs_bf16", "fp8", "bfloat16"), ("bf16_vs_f32", "bfloat16", "float32"), ("fp8_vs_f32", "fp8", "float32"))
  res["errors"][key] = {n: rel_errors(lat[x], lat[y]) for n, x, y in pairs if x in lat and y in lat}


def run_part(res: dict, name: str, runs: dict, fn) -> None:
  """``runs[p] = fn(p)`` for each precision, errors recorded instead of raised."""
  for p in list(runs):
    try:
      runs[p] = fn(p)
    except Exception as err:  # noqa: BLE001 - a failure (fp8 that does not compile, an OOM) is a result
      traceback.print_exc()
      runs[p] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    res["runs"][f"{name}/{p}"] = {k: v for k, v in runs[p].items() if k != "latents"}


def main(argv=None) -> int:
  a = parse(argv if argv is not None else sys.argv)
  start = time.monotonic()
  dev = jax.devices()[0]
  res = {
    "meta": {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__, "args": vars(a)},
    "runs": {},
    "errors": {},
    "skipped": [],
    "note": "random weights: quality on real weights is not measured",
  }
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  save = lambda: out.write_text(json.dumps(res, indent=1))  # noqa: E731
  parts = a.parts.split(",")
  models = None
  if {"speed", "guided"} & set(parts):
    t0 = time.perf_counter()
    models = models_of(a.model, a.seed, a.shrink)
    res["meta"]["weights_s"] = time.perf_counter() - t0
  for part in parts:
    if time.monotonic() - start > a.budget_s:
      res["skipped"].append(part)
      continue
    if part == "speed":
      runs = dict.fromkeys(("bfloat16", "fp8"))
      run_part(res, "speed", runs, lambda p, m=models: sample(m[p], "dpmpp_sde", a.guided_steps, a.frames, a, hlo=True))
      errors_at(res, f"guided_{a.guided_steps}_steps_F{a.frames}", runs)
    elif part == "guided":
      runs = dict.fromkeys(PRECISIONS)
      run_part(res, "guided", runs, lambda p, m=models: sample(m[p], "dpmpp_sde", a.guided_steps, a.ref_frames, a))
      errors_at(res, f"guided_{a.guided_steps}_steps_F{a.ref_frames}", runs)
    elif part == "turbo":
      models = None  # the guided model's weights go before the turbo model's are drawn
      turbo = models_of(f"{a.model}_turbo", a.seed, a.shrink)
      runs = dict.fromkeys(PRECISIONS)
      run_part(res, "turbo", runs, lambda p, m=turbo: sample(m[p], "turbo", a.turbo_steps, a.ref_frames, a))
      errors_at(res, f"turbo_{a.turbo_steps}_steps_F{a.ref_frames}", runs)
      del turbo
    save()
  res["meta"]["wall_s"] = time.monotonic() - start
  save()
  print(table(res))
  return 0


def table(res: dict) -> str:
  lines = [f"fp8 check on {res['meta']['device']} (random weights; quality on real weights not measured)"]
  for key, r in res["runs"].items():
    if "error" in r:
      lines.append(f"  {key:16s} FAILED: {r['error'][:160]}")
      continue
    gemms = f"  fp8 GEMMs {r['fp8_gemms']}/{r['cublas_gemms']} cuBLAS calls" if "fp8_gemms" in r else ""
    lines.append(
      f"  {key:16s} F={r['frames']:<4d} {r['ms_per_step']:9.1f} ms/step {r['ms_per_frame_step']:7.2f} ms/frame-step"
      f"  compile {r['compile_s']:5.1f} s{gemms}"
    )
  for key, errs in res["errors"].items():
    cells = "  ".join(f"{n} {e['max_rel']:.2e} max / {e['rms_rel']:.2e} rms" for n, e in errs.items())
    lines.append(f"  {key}: {cells}")
  if res["skipped"]:
    lines.append(f"  skipped (time budget): {', '.join(res['skipped'])}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
