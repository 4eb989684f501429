"""Measuring our JAX guided step for bench_step: compile and time each (D, F), FLOPs, memory, the max-frames search."""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import pathlib
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops as flops_lib
from benchmarks import step_report
from vinf_jax import parallel, sampling
from vinf_jax.config import UNetConfig, to_dtype
from vinf_jax.models import param_count, unet3d

if TYPE_CHECKING:
  from benchmarks.bench_step import BenchConfig

# Dense bf16 tensor-core peak of the H100 and H200 SXM datasheets (no sparsity).
DATASHEET_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
TEXT_TOKENS = 77
FPS = 24


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


def cache_entries(path: str) -> int:
  p = pathlib.Path(path) if path else None
  return len(list(p.iterdir())) if p and p.is_dir() else 0


def use_compilation_cache(bc: BenchConfig, meta: dict) -> None:
  """Turn on jax's persistent compilation cache in --compilation_cache; its entry count at start goes to meta."""
  meta["compilation_cache_entries_at_start"] = cache_entries(bc.compilation_cache)
  jax.config.update("jax_compilation_cache_dir", bc.compilation_cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def step_compiler_options(bc: BenchConfig, num_devices: int = 1) -> dict:
  """The XLA options of the step's compile: the sampler's (unless turned off), then --compiler_options."""
  base = (parallel.compiler_options(num_devices) or {}) if bc.pipeline_compiler_options else {}
  return {**base, **dict(bc.compiler_options)}


# ------------------------------------------------------------------------------------------------
# One (D, F) run


def run_config(model, bc: BenchConfig, d: int, f: int, steps: int, plan) -> dict:
  """Compile and time the guided step for D devices with F frames each; errors become the record's 'error'.

  ``steps=0`` (a max-frames probe): the first step only, no timed ones.
  """
  lh, lw = bc.latent_hw
  rec: dict = {"devices": d, "frames_per_device": f, "frames_total": f * d, "ok": False}
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
  try:
    _compile_and_time(rec, model, bc, d, f, steps, plan)
    rec["ok"] = True
  except Exception as err:  # noqa: BLE001 - every failure is a result (an OOM is the expected one)
    rec["oom"] = is_oom(err)
    rec["error"] = f"{type(err).__name__}: {err}"[:2000]
    if not rec["oom"] and not isinstance(err, ValueError):
      traceback.print_exc()
  finally:
    gc.collect()  # free the device buffers (_compile_and_time's, gone with its frame) before the next configuration
    rec["wall_s"] = time.perf_counter() - t_start
  return rec


def _compile_and_time(rec: dict, model, bc: BenchConfig, d: int, f: int, steps: int, plan) -> None:
  """The body of run_config: build, compile, time (and trace) the step of D devices with F frames each."""
  n = f * d
  parallel.check_frames(n, d, bc.temporal)
  mesh = parallel.make_mesh(d)
  den, compiled, state, inputs = _compile_step(rec, model, bc, mesh, d, f, plan)
  state = _time_steps(rec, den, compiled, state, inputs, bc, d, f, steps, plan)
  x = np.asarray(jax.device_get(state.x.addressable_shards[0].data), np.float32)
  rec["finite"] = bool(np.isfinite(x).all())
  # peak of the mesh's last device: with device counts run in ascending order it held nothing before
  # this device count's first run (the running peak cannot be reset from jax)
  rec["memory"] = device_memory(mesh.devices.flat[-1])


def _compile_step(rec: dict, model, bc: BenchConfig, mesh, d: int, f: int, plan):
  """The denoiser on ``mesh``, its step lowered and compiled (times, XLA's FLOPs and memory into ``rec``).

  Returns the denoiser, the compiled step, the first state and the step's other inputs (contexts, fps, seed).
  """
  lh, lw = bc.latent_hw
  extra = {"frame_chunk": bc.frame_chunk} if bc.frame_chunk else {}
  t0 = time.perf_counter()
  den = parallel.make_denoiser(
    model, plan, bc.temporal, mesh, latent_shape=(1, f * d, lh, lw, bc.unet.in_channels), **extra
  )
  rec["make_denoiser_s"] = time.perf_counter() - t0  # mostly the weights' host -> device copy
  rng = np.random.default_rng(bc.seed)
  ctx_c, ctx_u = (rng.standard_normal((1, TEXT_TOKENS, bc.unet.context_dim), dtype=np.float32) for _ in range(2))
  inputs = tuple(parallel.replicate(a, mesh) for a in (ctx_c, ctx_u, np.array([FPS], np.int32), np.int32(bc.seed)))
  state = den.init(inputs[-1])
  t0 = time.perf_counter()
  lowered = den.step.lower(den.params, state, *inputs)
  rec["lower_s"] = time.perf_counter() - t0
  entries = cache_entries(bc.compilation_cache)
  t0 = time.perf_counter()
  compiled = lowered.compile(compiler_options=step_compiler_options(bc, d) or None)
  rec["compile_s"] = time.perf_counter() - t0
  if bc.compilation_cache:  # a new entry: compiled (and written); none: loaded, compile_s is a load time
    rec["compile_cache"] = "miss" if cache_entries(bc.compilation_cache) > entries else "hit"
  del lowered
  if bc.hlo_dir:
    import gzip

    os.makedirs(bc.hlo_dir, exist_ok=True)
    with gzip.open(os.path.join(bc.hlo_dir, f"D{d}_F{f}.hlo.gz"), "wt") as fh:
      fh.write(compiled.as_text())
  rec["flops_xla"] = cost_flops(compiled)
  rec["xla_memory"] = memory_analysis(compiled)
  return den, compiled, state, inputs


def _time_steps(rec: dict, den, compiled, state, inputs, bc: BenchConfig, d: int, f: int, steps: int, plan):
  """One untimed first step, then ``steps`` timed ones (and the --trace_dir trace); returns the last state."""
  done = 0  # steps taken from this state; past the plan's end the state starts again (untimed)
  seed = inputs[-1]

  def one_step():
    nonlocal state, done
    state = compiled(den.params, state, *inputs)
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
  return state


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


def add_rates(rec: dict, matmul_flops: float | None, peak: float | None) -> None:
  if not rec.get("ok"):
    return
  rate = rec["flops_analytic"] / (rec["ms_per_step"] / 1e3)
  rec["analytic_flops_per_s"] = rate
  rec["mfu"] = rate / matmul_flops if matmul_flops else None
  rec["mfu_datasheet"] = rate / peak if peak else None
  x = rec.get("flops_xla")
  rec["xla_over_analytic"] = x / rec["flops_analytic_executed"] if x else None


def weak_scaling(runs: Sequence[dict]) -> list[dict]:
  """t1(F) / tD(F) for every F measured on 1 device and on D > 1 (F frames per device in both)."""
  t = {(r["devices"], r["frames_per_device"]): r["ms_per_step"] for r in runs if r["ok"]}
  out = []
  for (d, f), td in sorted(t.items()):
    if d > 1 and (1, f) in t:
      out.append({"frames_per_device": f, "devices": d, "t1_ms": t[(1, f)], "td_ms": td, "efficiency": t[(1, f)] / td})
  return out


# ------------------------------------------------------------------------------------------------
# Every (D, F) run of an invocation


@dataclasses.dataclass
class Budget:
  """--time_budget_s from ``start`` (a time.monotonic value), and how long the next run will take."""

  start: float
  budget_s: float
  runs: list  # the runs so far (the result's, as it grows)

  def time_left(self) -> float:
    return self.budget_s - (time.monotonic() - self.start) if self.budget_s > 0 else math.inf

  def next_run_s(self) -> float:
    # the longest run so far (a first compile is the longest part), or a guess before any
    return max((r.get("wall_s", 0.0) for r in self.runs), default=120.0) or 120.0


def prepare(bc: BenchConfig, res: dict) -> tuple:
  """The device, the matmul rate and the host UNet (into ``res``, printed); returns the model and the plan."""
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
  return model, sampling.make_plan(bc.sampler)


def measure_runs(model, plan, bc: BenchConfig, rf: step_report.ResultFile, budget: Budget) -> None:
  """Every (D, F) of --devices x --frames (skipped past the time budget), each saved and printed as it ends."""
  res = rf.res
  for d in bc.devices:  # ascending, so each device count's last device is fresh for its peak memory
    for f in bc.frames:
      if budget.time_left() < budget.next_run_s():
        rec = {"devices": d, "frames_per_device": f, "frames_total": d * f, "ok": False, "skipped": True}
        rec["error"] = (
          f"skipped: {budget.time_left():.0f} s of --time_budget_s left, the longest run took "
          f"{budget.next_run_s():.0f} s"
        )
      else:
        with rf.on_record(res, "running", {"devices": d, "frames_per_device": f}):
          rec = run_config(model, bc, d, f, bc.steps, plan)
      add_rates(rec, res["matmul"]["flops"], res["meta"]["datasheet_bf16_flops"])
      res["runs"].append(rec)
      print(step_report.run_line(rec), flush=True)
      rf.save()


# ------------------------------------------------------------------------------------------------
# The largest frame count D devices hold


def find_max_frames(model, plan, bc: BenchConfig, rf: step_report.ResultFile, budget: Budget) -> None:
  """The max-frames search on --max_frames_devices devices, into the result's 'max_frames' (saved per probe)."""
  res = rf.res
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
    with rf.on_record(mf, "probing", f):
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
    return max([p["wall_s"] for p in probe_runs] + [budget.next_run_s()])

  deadline = t0 + bc.max_frames_budget_s if bc.max_frames_budget_s > 0 else math.inf
  deadline = min(deadline, t0 + budget.time_left())  # a probe started in time must end in time
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
        on_probe=lambda part: (mf.update(part), rf.save()),
      )
    )
  except RuntimeError as err:
    mf["error"] = str(err)
  mf["seconds"] = time.monotonic() - t0


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
