r"""Time one guided denoising step of the UNet on 1..D devices: ms per frame-step, FLOPs, MFU, memory, scaling.

  # the step benchmark (full-size UNet, random bf16 weights, 320x512) on 1 and 2 GPUs, JSON next to the table
  python -m benchmarks.bench_step --frames 16,64,256 --devices 1,2 --out bench_step.json
  # with the PyTorch baseline (diffusers; eager fp16, and torch.compile) on the same GPU, in the same call
  python -m benchmarks.bench_step --frames 16,64 --devices 1 --torch_baseline --torch_compile
  # the largest frame count one device holds (slow: one compile per probe; 64 and 256 give the first guess)
  python -m benchmarks.bench_step --frames 64,256 --devices 1 --find_max_frames
  # ... and 4 devices (F per device; the largest of --devices unless --max_frames_devices says otherwise)
  python -m benchmarks.bench_step --frames 256,1024 --devices 4 --frame_chunk 16 --find_max_frames
  # CPU smoke run (what tests/test_benchmarks.py runs)
  python -m benchmarks.bench_step --preset tiny --dtype float32 --height 64 --width 64 --frames 8 --window 4 \
      --num_global 8 --matmul_size 128

One step is what ``vinf_jax.parallel.make_denoiser`` builds: both classifier-free-guidance branches in one
UNet call (batch 2) plus the sampler update, one XLA program over a ``frames`` mesh of D devices; F is the
number of frames EACH device holds (weak scaling: the video has F * D frames).

Reported per (D, F): compile time (``lower`` and ``compile`` timed apart), the median of ``--steps`` timed
steps (each ``block_until_ready``; the step donates its state, so each output state feeds the next call),
ms per frame-step (step time / F), FLOPs per step and device from XLA's cost analysis next to the analytic
count of ``benchmarks/flops.py``, MFU (analytic FLOPs / step time / the bf16 matmul rate measured in the
same run; also against the 989 TFLOP/s datasheet peak of H100/H200 SXM), and peak device memory. Then weak
scaling efficiency t1(F) / tD(F), optionally the largest F that D devices hold, and the ratio of the PyTorch
baseline's ms per frame-step to ours.

The output ends with a table (the device tool returns only the end of the output); everything, with
the device kind, versions, date and command line, goes to ``--out`` (rewritten after every run, so a
command cut off by a time limit still leaves what it measured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import inspect
import json
import math
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable (vinf_jax, benchmarks)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import flops as flops_lib
from vinf_jax import parallel, sampling
from vinf_jax.config import TemporalConfig, UNetConfig, preset, to_dtype
from vinf_jax.models import param_count, unet3d

# Dense bf16 tensor-core peak of the H100 and H200 SXM datasheets (no sparsity).
DATASHEET_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
TORCH_BASELINE = pathlib.Path(__file__).resolve().with_name("torch_unet3d_baseline.py")
TEXT_TOKENS = 77
FPS = 24

# A private FlagValues, not absl's global FLAGS: the tests import this module and convert.videocrafter2
# into one process, and both entry points have a --dtype and an --out.
FV = flags.FlagValues()
flags.DEFINE_enum("preset", "videocrafter2", ["videocrafter2", "tiny"], "UNet preset (random weights).", flag_values=FV)
flags.DEFINE_enum(
  "dtype", "bfloat16", ["bfloat16", "float16", "float32"], "UNet compute and parameter dtype.", flag_values=FV
)
flags.DEFINE_enum(
  "kernel_impl",
  "auto",
  ["auto", "jax", "pallas"],
  "UNetConfig.kernel_impl (elementwise kernels).",
  flag_values=FV,
)
flags.DEFINE_integer("height", 320, "Video height in pixels (latent = height / 8).", flag_values=FV)
flags.DEFINE_integer("width", 512, "Video width in pixels (latent = width / 8).", flag_values=FV)
flags.DEFINE_list(
  "frames", ["16", "64", "256"], "Frames per device F (weak scaling: the video has F * D).", flag_values=FV
)
flags.DEFINE_list("devices", ["1", "2"], "Device counts D of the frames mesh.", flag_values=FV)
flags.DEFINE_integer(
  "steps", 5, "Timed steps per (D, F) after one untimed warm-up step; the median is reported.", flag_values=FV
)
flags.DEFINE_enum("attention", "dual", ["dual", "full"], "Temporal attention mode.", flag_values=FV)
flags.DEFINE_integer("window", 8, "Dual-scope local half-window P.", flag_values=FV)
flags.DEFINE_integer("num_global", 16, "Dual-scope global frames G (must divide F * D).", flag_values=FV)
flags.DEFINE_integer(
  "frame_chunk", 0, "Passed to make_denoiser(frame_chunk=...) when nonzero (0: not passed).", flag_values=FV
)
flags.DEFINE_enum("sampler", "dpmpp_sde", list(sampling.SAMPLERS), "Sampler of the step's update.", flag_values=FV)
flags.DEFINE_integer("sampling_steps", 30, "Steps of the sampler's plan.", flag_values=FV)
flags.DEFINE_float("guidance", 12.0, "Classifier-free guidance scale.", flag_values=FV)
flags.DEFINE_integer(
  "matmul_size", 8192, "n of the n x n x n matmul that measures the achievable FLOP/s.", flag_values=FV
)
flags.DEFINE_integer("matmul_iters", 10, "Chained matmuls per timed call of the matmul benchmark.", flag_values=FV)
flags.DEFINE_string("out", "bench_step.json", "JSON file written with every figure ('' for none).", flag_values=FV)
flags.DEFINE_integer("seed", 0, "Seed of the random weights, contexts and noise.", flag_values=FV)
flags.DEFINE_bool(
  "find_max_frames",
  False,
  "Also search the largest F (per device) that --max_frames_devices devices hold: one compile and one step per "
  "probe, slow.",
  flag_values=FV,
)
flags.DEFINE_integer(
  "max_frames_devices", 0, "Device count of the max-frames search (0: the largest of --devices).", flag_values=FV
)
flags.DEFINE_integer("max_frames_step", 64, "Resolution of the max-frames search (a multiple of G).", flag_values=FV)
flags.DEFINE_integer("max_frames_limit", 4096, "Largest F (per device) the max-frames search probes.", flag_values=FV)
flags.DEFINE_float(
  "max_frames_budget_s", 0.0, "Stop the max-frames search after this many seconds (0: no limit).", flag_values=FV
)
flags.DEFINE_bool(
  "torch_baseline", False, "Run benchmarks/torch_unet3d_baseline.py (needs diffusers) first.", flag_values=FV
)
flags.DEFINE_list("torch_frames", ["16", "64"], "Frame counts of the PyTorch baseline (one GPU).", flag_values=FV)
flags.DEFINE_bool("torch_compile", False, "Also run the baseline under torch.compile.", flag_values=FV)
flags.DEFINE_string("torch_dtype", "float16", "dtype argument of the PyTorch baseline.", flag_values=FV)
flags.DEFINE_integer("torch_timeout_s", 600, "Timeout of each PyTorch baseline subprocess.", flag_values=FV)
flags.DEFINE_float(
  "time_budget_s",
  0.0,
  "Start no (D, F) run or max-frames probe that would, at the length of the longest run so far, end after "
  "this many seconds from the start (0: no limit); skipped runs are listed as such.",
  flag_values=FV,
)
flags.DEFINE_list(
  "compiler_options",
  [],
  "XLA options for the step's compile, name=value (e.g. xla_backend_optimization_level=0 to make CPU tests "
  "compile faster), over those of --pipeline_compiler_options.",
  flag_values=FV,
)
flags.DEFINE_bool(
  "pipeline_compiler_options",
  True,
  "Compile with vinf_jax.parallel.compiler_options(), as the sampler does (on GPU: cuBLAS GEMMs, no Triton); "
  "--nopipeline_compiler_options: XLA's defaults.",
  flag_values=FV,
)
flags.DEFINE_string(
  "trace_dir",
  "",
  "Also trace --trace_steps steps of each (D, F) run with jax.profiler into TRACE_DIR/D<d>_F<f> and add "
  "benchmarks/trace_summary's figures (GPU kernel time by kind, communication) to the run's record.",
  flag_values=FV,
)
flags.DEFINE_integer("trace_steps", 2, "Steps in each --trace_dir trace.", flag_values=FV)
flags.DEFINE_string(
  "hlo_dir",
  "",
  "Also write each (D, F) run's optimised HLO (compiled.as_text(), gzipped) to HLO_DIR/D<d>_F<f>.hlo.gz: the "
  "names of a trace's fusions are its instructions.",
  flag_values=FV,
)
flags.DEFINE_string(
  "compilation_cache",
  "",
  "jax persistent compilation cache directory ('' for none; compile times then "
  "measure cache loads for programs compiled before).",
  flag_values=FV,
)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What one invocation measures (the flags, validated; see the flag help for each field)."""

  unet: UNetConfig
  preset: str
  height: int
  width: int
  frames: tuple[int, ...]
  devices: tuple[int, ...]
  steps: int
  temporal: TemporalConfig
  frame_chunk: int
  sampler: sampling.SamplerConfig
  matmul_size: int
  matmul_iters: int
  out: str
  seed: int
  find_max_frames: bool
  max_frames_devices: int
  max_frames_step: int
  max_frames_limit: int
  max_frames_budget_s: float
  torch_baseline: bool
  torch_frames: tuple[int, ...]
  torch_compile: bool
  torch_dtype: str
  torch_timeout_s: int
  compilation_cache: str
  time_budget_s: float = 0.0
  trace_dir: str = ""
  trace_steps: int = 2
  hlo_dir: str = ""
  compiler_options: tuple[tuple[str, object], ...] = ()
  pipeline_compiler_options: bool = True

  @property
  def latent_hw(self) -> tuple[int, int]:
    return self.height // 8, self.width // 8  # the KL-f8 VAE


def config_from_flags(fv: flags.FlagValues) -> BenchConfig:
  e = []
  ints = {}
  for name in ("frames", "devices", "torch_frames"):
    try:
      ints[name] = tuple(sorted({int(v) for v in getattr(fv, name)}))
    except ValueError:
      e.append(f"--{name}={','.join(getattr(fv, name))}: expected comma-separated integers")
      ints[name] = ()
  ds = preset(fv.preset).unet.downsample_factor * 8
  if fv.height % ds or fv.width % ds:
    e.append(
      f"--height={fv.height} --width={fv.width}: both must be multiples of {ds} (VAE x8, then the UNet's levels)"
    )
  if fv.steps < 1:
    e.append(f"--steps={fv.steps}, expected >= 1")
  if any(d < 1 for d in ints["devices"]):
    e.append(f"--devices={fv.devices}, expected counts >= 1")
  if fv.trace_steps < 1:
    e.append(f"--trace_steps={fv.trace_steps}, expected >= 1")
  if fv.max_frames_step < 1:
    e.append(f"--max_frames_step={fv.max_frames_step}, expected >= 1")
  if fv.max_frames_devices < 0:
    e.append(f"--max_frames_devices={fv.max_frames_devices}, expected >= 0 (0: the largest of --devices)")
  if fv.frame_chunk and "frame_chunk" not in inspect.signature(parallel.make_denoiser).parameters:
    e.append(
      f"--frame_chunk={fv.frame_chunk}: this checkout's vinf_jax.parallel.make_denoiser has no frame_chunk "
      "argument yet (drop the flag, or update vinf_jax/parallel.py)"
    )
  options = []
  for item in fv.compiler_options:
    name, eq, value = item.partition("=")
    if not eq:
      e.append(f"--compiler_options: {item!r} is not name=value")
      continue
    options.append((name.strip(), _option_value(value.strip())))
  if e:
    raise ValueError("invalid flags:\n  - " + "\n  - ".join(e))
  temporal = TemporalConfig(attention=fv.attention, window=fv.window, num_global=fv.num_global).validate()
  derived = dict(
    unet=dataclasses.replace(preset(fv.preset).unet, dtype=fv.dtype, param_dtype=fv.dtype, kernel_impl=fv.kernel_impl),
    temporal=temporal,
    sampler=sampling.SamplerConfig(name=fv.sampler, steps=fv.sampling_steps, guidance=fv.guidance),
    compiler_options=tuple(options),
    **ints,
  )
  # every other field is the flag of its name
  plain = {f.name: getattr(fv, f.name) for f in dataclasses.fields(BenchConfig) if f.name not in derived}
  return BenchConfig(**derived, **plain)


def _option_value(v: str):
  if v.lower() in ("true", "false"):
    return v.lower() == "true"
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v


# ------------------------------------------------------------------------------------------------
# Measurements


def timed(fn: Callable[[], object], n: int) -> list[float]:
  """Seconds of n calls of fn, each waited for."""
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def matmul_rate(n: int, iters: int, dtype, reps: int) -> dict:
  """FLOP/s of chained n x n x n matmuls in ``dtype`` on the default device, timed like the step.

  ``iters`` matmuls run in one program so that the dispatch of a call (tens of microseconds) is not part of
  a 1.4 ms product; each depends on the last, so XLA cannot hoist them out of the loop.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)  # keeps |x| ~ 1 along the chain

  @jax.jit
  def chain(x, w):
    return jax.lax.fori_loop(0, iters, lambda _, y: jnp.dot(y, w), x)

  jax.block_until_ready(chain(a, b))
  t = float(np.median(timed(lambda: chain(a, b), max(reps, 3))))
  return {
    "size": n,
    "iters": iters,
    "dtype": jnp.dtype(dtype).name,
    "ms": 1e3 * t / iters,
    "flops": 2 * n**3 * iters / t,
  }


def cost_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program (``cost_analysis`` is a dict, or a list of them on older jax)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def memory_analysis(compiled) -> dict | None:
  """XLA's static buffer sizes of the program (bytes), or None where the backend has none."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
  out = {k: int(getattr(m, k, 0) or 0) for k in keys}
  # arguments + outputs + temporaries, minus outputs that reuse donated arguments
  out["total_bytes"] = out[keys[0]] + out[keys[1]] - out[keys[2]] + out[keys[3]]
  return out


def device_memory(device) -> dict:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats:
    return {"peak_bytes": None, "in_use_bytes": None, "limit_bytes": None}
  return {
    "peak_bytes": stats.get("peak_bytes_in_use"),
    "in_use_bytes": stats.get("bytes_in_use"),
    "limit_bytes": stats.get("bytes_limit"),
  }


def is_oom(err: BaseException) -> bool:
  s = str(err)
  return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()


def datasheet_flops(device_kind: str) -> float | None:
  return next((v for k, v in DATASHEET_BF16_FLOPS.items() if k in device_kind), None)


def build_host_unet(cfg: UNetConfig, seed: int) -> tuple[unet3d.UNet3D, float]:
  """The UNet with random weights (``pipeline.random_model``) held on the host, and the seconds it took.

  On the host, not the GPU: make_denoiser replicates the weights onto each run's mesh, and no extra
  device copy stays in memory during the runs.
  """
  from vinf_jax import pipeline

  t0 = time.perf_counter()
  host = jax.sharding.SingleDeviceSharding(pipeline.host_device())
  model = pipeline.random_model(unet3d.UNet3D, cfg, seed, sharding=host)
  return model, time.perf_counter() - t0


def _cache_entries(path: str) -> int:
  p = pathlib.Path(path) if path else None
  return len(list(p.iterdir())) if p and p.is_dir() else 0


def step_compiler_options(bc: BenchConfig, num_devices: int = 1) -> dict:
  """The XLA options of the step's compile: the sampler's (unless turned off), then --compiler_options."""
  base = (parallel.compiler_options(num_devices) or {}) if bc.pipeline_compiler_options else {}
  return {**base, **dict(bc.compiler_options)}


def run_config(model, bc: BenchConfig, d: int, f: int, steps: int, plan) -> dict:
  """Compile and time the guided step for D devices with F frames each; errors become the record's 'error'.

  ``steps=0`` (a max-frames probe): the first step only, no timed ones.
  """
  n = f * d
  lh, lw = bc.latent_hw
  rec: dict = {"devices": d, "frames_per_device": f, "frames_total": n, "ok": False}
  t_start = time.perf_counter()
  devs = jax.local_devices()
  if d > len(devs):
    rec["error"] = f"{d} devices requested, {len(devs)} available"
    return rec
  kw = dict(attention=bc.temporal.attention, window=bc.temporal.window, num_global=bc.temporal.num_global)
  rec["flops_analytic"] = flops_lib.step_flops(bc.unet, lh, lw, f, num_shards=d, **kw)
  rec["flops_analytic_executed"] = flops_lib.step_flops(
    bc.unet, lh, lw, f, num_shards=d, executed=True, query_block=bc.temporal.query_block, **kw
  )
  den = state = compiled = None
  try:
    parallel.check_frames(n, d, bc.temporal)
    mesh = parallel.make_mesh(d)
    extra = {"frame_chunk": bc.frame_chunk} if bc.frame_chunk else {}
    t0 = time.perf_counter()
    den = parallel.make_denoiser(
      model, plan, bc.temporal, mesh, latent_shape=(1, n, lh, lw, bc.unet.in_channels), **extra
    )
    rec["make_denoiser_s"] = time.perf_counter() - t0  # mostly the weights' host -> device copy
    rng = np.random.default_rng(bc.seed)
    ctx_c, ctx_u = (rng.standard_normal((1, TEXT_TOKENS, bc.unet.context_dim), dtype=np.float32) for _ in range(2))
    ctx_c, ctx_u, fps, seed = (
      parallel.replicate(a, mesh) for a in (ctx_c, ctx_u, np.array([FPS], np.int32), np.int32(bc.seed))
    )
    state = den.init(seed)
    args = (den.params, state, ctx_c, ctx_u, fps, seed)
    t0 = time.perf_counter()
    lowered = den.step.lower(*args)
    rec["lower_s"] = time.perf_counter() - t0
    entries = _cache_entries(bc.compilation_cache)
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=step_compiler_options(bc, d) or None)
    rec["compile_s"] = time.perf_counter() - t0
    if bc.compilation_cache:  # a new entry: compiled (and written); none: loaded, compile_s is a load time
      rec["compile_cache"] = "miss" if _cache_entries(bc.compilation_cache) > entries else "hit"
    del lowered
    if bc.hlo_dir:
      import gzip

      os.makedirs(bc.hlo_dir, exist_ok=True)
      with gzip.open(os.path.join(bc.hlo_dir, f"D{d}_F{f}.hlo.gz"), "wt") as fh:
        fh.write(compiled.as_text())
    rec["flops_xla"] = cost_flops(compiled)
    rec["xla_memory"] = memory_analysis(compiled)

    done = 0  # steps taken from this state; past the plan's end the state starts again (untimed)

    def one_step():
      nonlocal state, done
      state = compiled(den.params, state, ctx_c, ctx_u, fps, seed)
      done += 1
      return state

    def restart_if_done():
      nonlocal state, done
      if done == sampling.num_steps(plan):
        state, done = jax.block_until_ready(den.init(seed)), 0

    rec["first_step_s"] = timed(one_step, 1)[0]
    ts = []
    for _ in range(steps):
      restart_if_done()
      ts += timed(one_step, 1)
    rec["step_ms_all"] = [1e3 * t for t in ts]
    if ts:
      rec["ms_per_step"] = float(np.median(rec["step_ms_all"]))
      rec["ms_per_frame_step"] = rec["ms_per_step"] / f
    if bc.trace_dir:
      rec["trace"] = trace_steps(one_step, restart_if_done, bc, d, f)
    x = np.asarray(jax.device_get(state.x.addressable_shards[0].data), np.float32)
    rec["finite"] = bool(np.isfinite(x).all())
    # peak of the mesh's last device: with device counts run in ascending order it held nothing before
    # this device count's first run (the running peak cannot be reset from jax)
    rec["memory"] = device_memory(mesh.devices.flat[-1])
    rec["ok"] = True
  except Exception as err:  # noqa: BLE001 - every failure is a result (an OOM is the expected one)
    rec["oom"] = is_oom(err)
    rec["error"] = f"{type(err).__name__}: {err}"[:2000]
    if not rec["oom"] and not isinstance(err, ValueError):
      traceback.print_exc()
  finally:
    den = state = compiled = None  # free the device buffers before the next configuration
    gc.collect()
    rec["wall_s"] = time.perf_counter() - t_start
  return rec


def trace_steps(one_step, restart_if_done, bc: BenchConfig, d: int, f: int) -> dict:
  """Trace ``bc.trace_steps`` steps into TRACE_DIR/D<d>_F<f>; their summary (benchmarks/trace_summary)."""
  from benchmarks import trace_summary

  path = pathlib.Path(bc.trace_dir) / f"D{d}_F{f}"
  restart_if_done()
  with jax.profiler.trace(str(path), create_perfetto_trace=True):
    for _ in range(bc.trace_steps):
      restart_if_done()
      jax.block_until_ready(one_step())
  try:
    trace = trace_summary.find_trace(path)
    summary = trace_summary.summarize(trace_summary.load_events(trace), bc.trace_steps)
  except (OSError, ValueError, KeyError) as err:  # a trace that cannot be read is reported, not fatal
    return {"path": str(path), "error": f"{type(err).__name__}: {err}"}
  if summary:
    print(trace_summary.format_summary({k: summary[k] for k in list(summary)[:1]}, top=8), flush=True)
  return {"path": str(trace), "steps": bc.trace_steps, "devices": summary}


def search_max_frames(
  fits: Callable[[int], bool],
  *,
  step: int,
  limit: int,
  known_fit: int = 0,
  guess: int | None = None,
  deadline: float | None = None,
  clock: Callable[[], float] = time.monotonic,
  reserve: Callable[[], float] = lambda: 0.0,
  on_probe: Callable[[dict], None] | None = None,
) -> dict:
  """The largest multiple of ``step`` up to ``limit`` for which ``fits`` holds, assuming it is monotone.

  Brackets from the first probe (``guess`` when given, else twice ``known_fit``, else ``step``), galloping
  up after a fit or down after a failure (increments from ``step`` after a guess, else doubling from the first
  probe), then bisects. Stops early when less than ``reserve()`` seconds (the length of a probe) are left
  before ``deadline`` (a ``clock`` value); the result says whether it finished. ``on_probe`` gets the
  bracket so far (an unfinished result) after every probe.
  """

  def rnd(x):
    return max(step, int(x) // step * step)

  lo, hi, probes = known_fit, None, []

  def probe(x):
    ok = bool(fits(x))
    probes.append({"frames": x, "fits": ok})
    if on_probe:
      fit, fail = ([p["frames"] for p in probes if p["fits"] == want] for want in (True, False))
      largest, smallest = max([known_fit, *fit]) or None, min(fail, default=None)
      on_probe({"largest_fit": largest, "smallest_fail": smallest, "complete": False, "probes": probes})
    return ok

  def out_of_time():
    return deadline is not None and clock() + reserve() >= deadline

  x = rnd(guess) if guess else rnd(2 * known_fit) if known_fit else step
  x = min(x, rnd(limit))
  inc = step if guess else x
  if x <= lo:
    x = lo + step
  if x <= limit and not out_of_time():
    if probe(x):
      lo = x
      while not out_of_time():
        nxt = min(lo + inc, rnd(limit))
        if nxt <= lo:
          break  # reached the limit: everything up to it fits
        if probe(nxt):
          lo, inc = nxt, 2 * inc
        else:
          hi = nxt
          break
    else:
      hi = x
      while not out_of_time() and hi - step > lo:
        nxt = max(hi - inc, lo)
        if nxt == lo or nxt <= 0:
          break
        if probe(nxt):
          lo = nxt
          break
        hi, inc = nxt, 2 * inc
  while hi is not None and hi - lo > step and not out_of_time():
    mid = (lo + hi) // 2 // step * step
    if mid <= lo:
      mid = lo + step
    if probe(mid):
      lo = mid
    else:
      hi = mid
  complete = (hi is not None and hi - lo <= step) or (hi is None and lo >= rnd(limit))
  return {"largest_fit": lo or None, "smallest_fail": hi, "resolution": step, "complete": complete, "probes": probes}


def guess_max_frames(runs: Sequence[dict], devices: int = 1) -> int | None:
  """F per device where XLA's static memory of the D-device program (per device), linear in F, fills a device.

  From the runs on ``devices`` devices; None without two frame counts of them.
  """
  ok = [r for r in runs if r["ok"] and r["devices"] == devices and r["memory"]["limit_bytes"]]
  pts = sorted({(r["frames_per_device"], r["xla_memory"]["total_bytes"]) for r in ok if r.get("xla_memory")})
  limits = [r["memory"]["limit_bytes"] for r in ok]
  if len(pts) < 2 or not limits:
    return None
  (f0, b0), (f1, b1) = pts[0], pts[-1]
  slope = (b1 - b0) / (f1 - f0)
  if slope <= 0:
    return None
  return int((0.97 * min(limits) - (b1 - slope * f1)) / slope)  # 3% for the allocator's fragmentation


# ------------------------------------------------------------------------------------------------
# The PyTorch baseline (a subprocess, before JAX takes the GPU's memory)

_TORCH_LINE = re.compile(
  r"F=\s*(\d+)\s+step\(CFG\)=\s*([\d.]+)\s*ms\s+per-frame-step=\s*([\d.]+)\s*ms\s+peak=\s*([\d.]+)\s*GiB"
)


def parse_torch_output(text: str) -> list[dict]:
  return [
    {"frames": int(m[1]), "ms_per_step": float(m[2]), "ms_per_frame_step": float(m[3]), "peak_gib": float(m[4])}
    for m in _TORCH_LINE.finditer(text)
  ]


def run_torch_baseline(frames: Sequence[int], dtype: str, compile_: bool, timeout_s: int) -> dict:
  """One run of the baseline script; {'rows': [...]} or {'error': ...} with the end of its output."""
  cmd = [sys.executable, str(TORCH_BASELINE), dtype, ",".join(str(f) for f in frames)] + (
    ["compile"] if compile_ else []
  )
  out = {"command": shlex.join(cmd), "mode": "compile" if compile_ else "eager", "dtype": dtype}
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except (subprocess.TimeoutExpired, OSError) as err:
    out["error"] = f"{type(err).__name__}: {err}"
    return out
  out["wall_s"] = time.perf_counter() - t0
  out["rows"] = parse_torch_output(p.stdout)
  if p.returncode or not out["rows"]:
    tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
    out["error"] = f"exit code {p.returncode}, {len(out['rows'])} result lines; last lines:\n" + "\n".join(tail)
  return out


# ------------------------------------------------------------------------------------------------
# The whole benchmark


def weak_scaling(runs: Sequence[dict]) -> list[dict]:
  """t1(F) / tD(F) for every F measured on 1 device and on D > 1 (F frames per device in both)."""
  t = {(r["devices"], r["frames_per_device"]): r["ms_per_step"] for r in runs if r["ok"]}
  out = []
  for (d, f), td in sorted(t.items()):
    if d > 1 and (1, f) in t:
      out.append({"frames_per_device": f, "devices": d, "t1_ms": t[(1, f)], "td_ms": td, "efficiency": t[(1, f)] / td})
  return out


def torch_ratios(runs: Sequence[dict], baselines: Sequence[dict]) -> list[dict]:
  """PyTorch ms per frame-step over ours (one device, the same F): > 1 means we are faster."""
  ours = {r["frames_per_device"]: r["ms_per_frame_step"] for r in runs if r["ok"] and r["devices"] == 1}
  out = []
  for b in baselines:
    for row in b.get("rows", []):
      if row["frames"] in ours:
        out.append(
          {
            "frames": row["frames"],
            "mode": b["mode"],
            "torch_ms_per_frame_step": row["ms_per_frame_step"],
            "ours_ms_per_frame_step": ours[row["frames"]],
            "ratio": row["ms_per_frame_step"] / ours[row["frames"]],
          }
        )
  return out


def add_rates(rec: dict, matmul_flops: float | None, peak: float | None) -> None:
  if not rec.get("ok"):
    return
  rate = rec["flops_analytic"] / (rec["ms_per_step"] / 1e3)
  rec["analytic_flops_per_s"] = rate
  rec["mfu"] = rate / matmul_flops if matmul_flops else None
  rec["mfu_datasheet"] = rate / peak if peak else None
  x = rec.get("flops_xla")
  rec["xla_over_analytic"] = x / rec["flops_analytic_executed"] if x else None


def versions() -> dict:
  import flax
  import jaxlib

  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": getattr(jaxlib, "__version__", None),
    "flax": flax.__version__,
  }


def run(bc: BenchConfig, argv: Sequence[str]) -> dict:
  """Every measurement of one invocation, as the JSON-ready dict (also written to ``bc.out`` as it grows)."""
  start = time.monotonic()
  res: dict = {
    "meta": {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "command": shlex.join(["python", "-m", "benchmarks.bench_step", *argv[1:]]),
      "versions": versions(),
      "env": {
        k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")
      },
      "preset": bc.preset,
      "unet": dataclasses.asdict(bc.unet),
      "video": [bc.height, bc.width],
      "latent": list(bc.latent_hw),
      "temporal": dataclasses.asdict(bc.temporal),
      "sampler": dataclasses.asdict(bc.sampler),
      "frame_chunk": bc.frame_chunk,
      "steps_timed": bc.steps,
      "compilation_cache": bc.compilation_cache or None,
      "time_budget_s": bc.time_budget_s or None,
      "compiler_options": step_compiler_options(bc, max(bc.devices, default=1)),  # of the largest D
    },
    "runs": [],
  }

  def save():
    if bc.out:
      p = pathlib.Path(bc.out)
      p.parent.mkdir(parents=True, exist_ok=True)
      p.write_text(json.dumps(res, indent=1, default=_json_default) + "\n")

  @contextlib.contextmanager
  def on_record(where: dict, key: str, value):
    """``where[key] = value`` in the saved JSON while the block runs: a call cut off there leaves it on record."""
    where[key] = value
    save()
    try:
      yield
    finally:
      del where[key]

  if bc.torch_baseline:
    # first, while JAX has not yet taken (by default 75% of) the GPU's memory
    modes = [False, True] if bc.torch_compile else [False]
    res["torch_baseline"] = [run_torch_baseline(bc.torch_frames, bc.torch_dtype, c, bc.torch_timeout_s) for c in modes]
    for b in res["torch_baseline"]:
      print(f"torch baseline ({b['mode']}): " + (b.get("error") or f"{len(b['rows'])} rows, {b['wall_s']:.0f} s"))
    save()

  if bc.compilation_cache:
    res["meta"]["compilation_cache_entries_at_start"] = _cache_entries(bc.compilation_cache)
    jax.config.update("jax_compilation_cache_dir", bc.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

  if not bc.devices:  # --devices= : the PyTorch baseline alone (run beside the JAX runs, on another GPU)
    save()
    print(format_table(res))
    return res

  dev = jax.devices()[0]
  meta = res["meta"]
  meta.update(
    backend=jax.default_backend(),
    device_kind=dev.device_kind,
    device_count=jax.device_count(),
    datasheet_bf16_flops=datasheet_flops(dev.device_kind),
  )
  print(f"{dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  res["matmul"] = matmul_rate(bc.matmul_size, bc.matmul_iters, to_dtype(bc.unet.dtype), bc.steps)
  print(f"matmul {bc.matmul_size}^3 {res['matmul']['dtype']}: {res['matmul']['flops'] / 1e12:.1f} TFLOP/s", flush=True)

  model, meta["init_s"] = build_host_unet(bc.unet, bc.seed)
  meta["param_count"] = param_count(model)
  print(
    f"UNet {meta['param_count'] / 1e6:.1f} M parameters ({bc.unet.param_dtype}), {meta['init_s']:.1f} s", flush=True
  )
  plan = sampling.make_plan(bc.sampler)

  def time_left() -> float:
    return bc.time_budget_s - (time.monotonic() - start) if bc.time_budget_s > 0 else math.inf

  def next_run_s() -> float:
    # the longest run so far (a first compile is the longest part), or a guess before any
    return max((r.get("wall_s", 0.0) for r in res["runs"]), default=120.0) or 120.0

  for d in bc.devices:  # ascending, so each device count's last device is fresh for its peak memory
    for f in bc.frames:
      if time_left() < next_run_s():
        rec = {"devices": d, "frames_per_device": f, "frames_total": d * f, "ok": False, "skipped": True}
        rec["error"] = (
          f"skipped: {time_left():.0f} s of --time_budget_s left, the longest run took {next_run_s():.0f} s"
        )
      else:
        with on_record(res, "running", {"devices": d, "frames_per_device": f}):
          rec = run_config(model, bc, d, f, bc.steps, plan)
      add_rates(rec, res["matmul"]["flops"], meta["datasheet_bf16_flops"])
      res["runs"].append(rec)
      print(_run_line(rec), flush=True)
      save()
  res["weak_scaling"] = weak_scaling(res["runs"])

  if bc.find_max_frames:
    d = bc.max_frames_devices or max(bc.devices)
    known = max((r["frames_per_device"] for r in res["runs"] if r["ok"] and r["devices"] == d), default=0)
    # F per device: F * D must pass parallel.check_frames for every D, so F itself is a multiple of G
    step = math.lcm(bc.max_frames_step, parallel.lcm_frames(1, bc.temporal))
    guess = guess_max_frames(res["runs"], d)
    t0 = time.monotonic()
    probe_runs = []
    # what is known so far, saved after every probe (a call cut off by its time limit keeps it)
    mf = res["max_frames"] = {"devices": d, "resolution": step, "guess": guess, "probe_runs": probe_runs}
    mf.update(largest_fit=known or None, smallest_fail=None, complete=False, probes=[])

    def fits(f):
      with on_record(mf, "probing", f):
        rec = run_config(model, bc, d, f, 0, plan)
      keep = ("frames_per_device", "frames_total", "ok", "oom", "error", "compile_s", "first_step_s", "wall_s")
      probe_runs.append(
        {k: rec.get(k) for k in keep} | {"xla_memory": rec.get("xla_memory"), "memory": rec.get("memory")}
      )
      print(
        f"max frames probe D={d} F={f} ({d * f} frames): " + ("fits" if rec["ok"] else rec["error"][:200]), flush=True
      )
      if not rec["ok"] and not rec.get("oom"):
        raise RuntimeError(f"F={f} failed with something else than running out of memory: {rec['error']}")
      return rec["ok"]

    def probe_s():  # the next probe takes as long as the longest so far (a guess before the first)
      return max([p["wall_s"] for p in probe_runs] + [next_run_s()])

    deadline = t0 + bc.max_frames_budget_s if bc.max_frames_budget_s > 0 else math.inf
    deadline = min(deadline, t0 + time_left())  # a probe started in time must end in time
    deadline = None if deadline == math.inf else deadline
    try:
      mf.update(
        search_max_frames(
          fits,
          step=step,
          limit=bc.max_frames_limit,
          known_fit=known,
          guess=guess,
          deadline=deadline,
          reserve=probe_s,
          on_probe=lambda part: (mf.update(part), save()),
        )
      )
    except RuntimeError as err:
      mf["error"] = str(err)
    mf["seconds"] = time.monotonic() - t0
  if res.get("torch_baseline"):
    res["torch_ratio"] = torch_ratios(res["runs"], res["torch_baseline"])
  save()
  print(format_table(res))
  return res


def _run_line(r: dict) -> str:
  if not r["ok"]:
    kind = "OOM" if r.get("oom") else "skipped" if r.get("skipped") else "error"
    return f"D={r['devices']} F={r['frames_per_device']}: {kind}: {r['error'][:300]}"
  return (
    f"D={r['devices']} F={r['frames_per_device']}: compile {r['compile_s']:.1f} s, {r['ms_per_step']:.1f} ms/step, "
    f"{r['ms_per_frame_step']:.2f} ms/frame-step"
  )


def _fmt(v, spec: str, scale: float = 1.0) -> str:
  return "-" if v is None else format(v * scale, spec)


def format_table(res: dict) -> str:
  """The human-readable summary printed at the end."""
  m = res["meta"]
  if "device_kind" not in m:  # no JAX runs (--devices=): the baseline only
    return "\n".join(
      f"torch baseline ({b['mode']}): "
      + (b.get("error") or ", ".join(f"F={r['frames']} {r['ms_per_frame_step']:.2f} ms/frame-step" for r in b["rows"]))
      for b in res.get("torch_baseline", [])
    )
  t = m["temporal"]
  att = f"dual P={t['window']} G={t['num_global']}" if t["attention"] == "dual" else "full"
  lines = [
    "",
    f"== bench_step {m['date']}: {m['device_kind']} ({m['backend']}), jax {m['versions']['jax']}, "
    f"flax {m['versions']['flax']}",
    f"   {m['command']}",
    f"   {m['preset']} {m['unet']['dtype']} {m['video'][0]}x{m['video'][1]} (latent {m['latent'][0]}x"
    f"{m['latent'][1]}), {att}, {m['sampler']['name']} CFG {m['sampler']['guidance']:g}, "
    f"median of {m['steps_timed']} steps; weights: init {m['init_s']:.1f} s",
    f"   matmul {res['matmul']['size']}^3 {res['matmul']['dtype']}: {res['matmul']['flops'] / 1e12:.1f} TFLOP/s "
    f"(MFU's denominator); datasheet {_fmt(m['datasheet_bf16_flops'], '.0f', 1e-12)} TFLOP/s",
    "",
    f"{'D':>2} {'F':>5} {'compile s':>9} {'ms/step':>9} {'ms/frame':>9} {'TFLOP/step':>10} {'xla/an':>6} "
    f"{'MFU':>5} {'MFU(ds)':>7} {'peak GiB':>8}",
  ]
  for r in res["runs"]:
    if not r["ok"]:
      kind = "OOM" if r.get("oom") else "skipped" if r.get("skipped") else "error"
      lines.append(f"{r['devices']:>2} {r['frames_per_device']:>5}  {kind}: {r['error'].splitlines()[0][:80]}")
      continue
    lines.append(
      f"{r['devices']:>2} {r['frames_per_device']:>5} {r['compile_s']:>9.1f} {r['ms_per_step']:>9.1f} "
      f"{r['ms_per_frame_step']:>9.2f} {r['flops_analytic'] / 1e12:>10.1f} {_fmt(r['xla_over_analytic'], '6.2f')} "
      f"{_fmt(r['mfu'], '5.1%')} {_fmt(r['mfu_datasheet'], '7.1%')} "
      f"{_fmt(r['memory']['peak_bytes'], '8.1f', 2**-30)}"
    )
  lines.append("   TFLOP/step: analytic, per device; xla/an: XLA's count over the analytic count of what runs")
  if res.get("weak_scaling"):
    lines.append(
      "weak scaling (t1 / tD, F frames per device): "
      + ", ".join(f"F={w['frames_per_device']} D={w['devices']}: {w['efficiency']:.1%}" for w in res["weak_scaling"])
    )
  if "max_frames" in res:
    mf = res["max_frames"]
    where = f"max frames per device on {mf.get('devices', 1)} device(s)"
    if "error" in mf:
      lines.append(f"{where}: error: {mf['error'][:200]}")
    else:
      probes = " ".join(f"{p['frames']}{'+' if p['fits'] else 'x'}" for p in mf["probes"])
      lines.append(
        f"{where}: {mf['largest_fit']} fits, {mf['smallest_fail']} does not "
        f"({'complete' if mf['complete'] else 'INCOMPLETE'}; probes {probes}; guess {mf['guess']}; "
        f"{mf['seconds']:.0f} s)"
      )
  for b in res.get("torch_baseline", []):
    if b.get("error"):
      lines.append(f"torch baseline ({b['mode']}): ERROR {b['error']}")
  for r in res.get("torch_ratio", []):
    lines.append(
      f"torch {r['mode']} / ours at F={r['frames']} (1 device): {r['torch_ms_per_frame_step']:.2f} / "
      f"{r['ours_ms_per_frame_step']:.2f} ms per frame-step = {r['ratio']:.2f}x"
    )
  return "\n".join(lines)


def _json_default(o):
  if isinstance(o, (np.integer, np.floating, np.bool_)):
    return o.item()
  if isinstance(o, (tuple, set)):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__ + "\nflags:\n" + FV.get_help())
    return 0
  FV.unparse_flags()
  try:
    rest = FV(argv)
    if len(rest) > 1:
      raise ValueError(f"unexpected arguments {rest[1:]}")
    bc = config_from_flags(FV)
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  run(bc, argv)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
