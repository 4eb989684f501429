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

import dataclasses
import inspect
import pathlib
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable (vinf_jax, benchmarks)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags

from benchmarks import options, step_measure, step_report, torch_baseline
from vinf_jax import parallel, sampling
from vinf_jax.config import TemporalConfig, UNetConfig, preset

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
  "query_block", 0, "Dual-scope query frames per block (TemporalConfig.query_block; 0: automatic).", flag_values=FV
)
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
flags.DEFINE_integer(
  "geglu_rows",
  0,
  "Rows per block of the Pallas GEGLU kernel (vinf_jax.layers.kernels._GEGLU_ROWS; 0: the package's, 16).",
  flag_values=FV,
)
flags.DEFINE_enum(
  "temporal_kernel",
  None,
  ["off", "on", "merged"],
  "The dual-scope attention through the Pallas window kernel where it applies ('on': GPUs with 16-bit compute; "
  "'merged': only in its one-block form) or not ('off': cuDNN's fused attention); unset: the package's "
  "vinf_jax.layers.attention.TEMPORAL_KERNEL.",
  flag_values=FV,
)
flags.DEFINE_string(
  "window_tuning",
  "",
  "The window kernel's problems a program and warps per form, FORM=N:W,... (e.g. merged=8:4,blocked=1:4; "
  "vinf_jax.layers.kernels.WINDOW_TUNING; empty: the package's).",
  flag_values=FV,
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
  temporal = TemporalConfig(
    attention=fv.attention, window=fv.window, num_global=fv.num_global, query_block=fv.query_block
  ).validate()
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
# The whole benchmark


def run(bc: BenchConfig, argv: Sequence[str]) -> dict:
  """Every measurement of one invocation, as the JSON-ready dict (also written to ``bc.out`` as it grows)."""
  start = time.monotonic()
  options = step_measure.step_compiler_options(bc, max(bc.devices, default=1))  # of the largest D
  res = step_report.new_result(bc, argv, options)
  rf = step_report.ResultFile(res, bc.out)
  if bc.torch_baseline:  # first, while JAX has not yet taken the GPU's memory
    res["torch_baseline"] = torch_baseline.run_baselines(bc)
    rf.save()
  if bc.compilation_cache:
    step_measure.use_compilation_cache(bc, res["meta"])
  if not bc.devices:  # --devices= : the PyTorch baseline alone (run beside the JAX runs, on another GPU)
    rf.save()
    print(step_report.format_table(res))
    return res

  model, plan = step_measure.prepare(bc, res)
  budget = step_measure.Budget(start, bc.time_budget_s, res["runs"])
  step_measure.measure_runs(model, plan, bc, rf, budget)
  res["weak_scaling"] = step_measure.weak_scaling(res["runs"])
  if bc.find_max_frames:
    step_measure.find_max_frames(model, plan, bc, rf, budget)
  if res.get("torch_baseline"):
    res["torch_ratio"] = torch_baseline.torch_ratios(res["runs"], res["torch_baseline"])
  rf.save()
  print(step_report.format_table(res))
  return res


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
    if FV.geglu_rows < 0 or FV.geglu_rows & (FV.geglu_rows - 1):
      raise ValueError(f"--geglu_rows={FV.geglu_rows}, expected 0 or a power of two")
    tuning = options.parse_window_tuning(FV.window_tuning)
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from vinf_jax.layers import attention, kernels

  if FV.geglu_rows:
    kernels._GEGLU_ROWS = FV.geglu_rows  # the command line (in the JSON) records it
  if FV.temporal_kernel:
    attention.TEMPORAL_KERNEL = FV.temporal_kernel
  kernels.WINDOW_TUNING.update(tuning)
  run(bc, argv)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
