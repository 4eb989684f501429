r"""Make a long video: ``python -m vinf_jax.sample --flagfile configs/NAME.flags [--flag=value ...]``.

Flags -> a frozen :class:`vinf_jax.pipeline.GenerationConfig` -> :func:`vinf_jax.pipeline.generate`.
Flags on the command line override the flagfile's; a ``--prompt`` or ``--prompts_file`` on the command
line replaces the flagfile's prompts instead of adding to them.

Exit status: 0 done; 2 bad settings (nothing was loaded, compiled or written), or another run is writing
the same outputs; 1 the run failed (NaN latents, a failed write, out of memory, ...), with nothing written
where the video goes (after a failed write the message says where the sampled state was saved); 143 / 130
stopped by SIGTERM / SIGINT (Ctrl-C): the state saved as a resumable one when sampling had begun, the partial
files removed, and one line with the command that continues (a second signal stops at once).

A relative ``--flagfile`` that is not found from the current directory is looked up beside the package
too (a source checkout: ``configs/NAME.flags`` works from any directory).

Several hosts: start the same command on every host with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or ``--distributed`` on Slurm / Open MPI / TPU, or with
``JAX_COORDINATOR_ADDRESS`` set, where JAX finds the rest itself); process 0 writes the outputs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys

from absl import flags, logging

from vinf_jax.pipeline import DTYPES, GenerationConfig

_D = GenerationConfig()
# Own flag set: other entry points (the converter) define flags of the same names in absl's global one.
F = flags.FlagValues()

# What to make
flags.DEFINE_multi_string(
  "prompt",
  [],
  "A prompt; repeat it for several prompts over one video (prompt i covers the i-th equal segment).",
  flag_values=F,
)
flags.DEFINE_string(
  "prompts_file",
  "",
  "A text file of prompts, one per line ('#' comments and blank lines skipped), after any --prompt.",
  flag_values=F,
)
flags.DEFINE_string(
  "negative_prompt", _D.negative_prompt, "The unconditional text of classifier-free guidance.", flag_values=F
)
flags.DEFINE_integer("frames", _D.frames, "Frames of the whole video (split over the devices).", flag_values=F)
flags.DEFINE_integer("height", _D.height, "Video height in pixels (a multiple of 64).", flag_values=F)
flags.DEFINE_integer("width", _D.width, "Video width in pixels (a multiple of 64).", flag_values=F)
flags.DEFINE_integer(
  "fps",
  None,
  "Frame rate the UNet is conditioned on (VideoCrafter2 28, Video-Infinity 24; default 24, 16 for --sampler=turbo).",
  flag_values=F,
)
flags.DEFINE_integer("seed", _D.seed, "Noise seed; the video does not depend on the device count.", flag_values=F)
flags.DEFINE_integer(
  "prompt_transition",
  _D.prompt_transition,
  "Frames over which each prompt blends into the next (0 = hard cut).",
  flag_values=F,
)
# Model
flags.DEFINE_string(
  "weights",
  _D.weights,
  "Converted weights directory (python -m convert.videocrafter2); empty = random weights of --model.",
  flag_values=F,
)
flags.DEFINE_string(
  "model",
  _D.model,
  "Model preset (tiny, videocrafter2, their _turbo / _turbo_v2 variants, modelscope, zeroscope_576w, zeroscope_xl, "
  "tiny_t2v; --helpfull lists them): the random-weights model, or a check of --weights.",
  flag_values=F,
)
flags.DEFINE_integer("weights_seed", _D.weights_seed, "Seed of random weights (without --weights).", flag_values=F)
flags.DEFINE_enum(
  "dtype", _D.dtype, DTYPES, "Compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU.", flag_values=F
)
# Sampler
flags.DEFINE_string(
  "sampler",
  _D.sampler,
  "dpmpp_sde (Video-Infinity), ddim (VideoCrafter2) or turbo (T2V-Turbo weights: one UNet call per step).",
  flag_values=F,
)
flags.DEFINE_integer(
  "steps",
  None,
  "Sampling steps (default 30; 4 for --sampler=turbo, T2V-Turbo's; DDIM may run more: --ddim_exact_steps).",
  flag_values=F,
)
flags.DEFINE_float(
  "guidance",
  _D.guidance,
  "Classifier-free guidance scale (>= 0; default 12), or for --sampler=turbo the UNet's embedded w (default 7.5).",
  flag_values=F,
)
flags.DEFINE_integer(
  "turbo_origin", _D.turbo_origin, "turbo: the timestep grid (50: T2V-Turbo v1's; 200: v2's).", flag_values=F
)
flags.DEFINE_float(
  "motion_scale", _D.motion_scale, "turbo on T2V-Turbo-v2 weights: the motion conditioning scale.", flag_values=F
)
flags.DEFINE_float(
  "motion_cutoff",
  _D.motion_cutoff,
  "turbo on T2V-Turbo-v2 weights: no motion conditioning for timesteps < 1000 * (1 - this).",
  flag_values=F,
)
flags.DEFINE_float("eta", _D.eta, "DDIM noise level (0 = deterministic; VideoCrafter2 uses 1).", flag_values=F)
flags.DEFINE_bool(
  "ddim_exact_steps",
  _D.ddim_exact_steps,
  "DDIM: exactly --steps steps instead of VideoCrafter2's spacing.",
  flag_values=F,
)
# Temporal parallelism
flags.DEFINE_string(
  "attention",
  _D.attention,
  "Temporal attention: dual (Video-Infinity's dual scope) or full (all frames).",
  flag_values=F,
)
flags.DEFINE_integer("window", _D.window, "Dual scope: local half-window P in frames.", flag_values=F)
flags.DEFINE_integer("num_global", _D.num_global, "Dual scope: global frames G (divides --frames).", flag_values=F)
flags.DEFINE_float(
  "global_phase_from", _D.global_phase_from, "Dual scope: timesteps >= this bias the global frames.", flag_values=F
)
flags.DEFINE_float(
  "local_phase_below", _D.local_phase_below, "Dual scope: timesteps < this bias the local window.", flag_values=F
)
flags.DEFINE_integer(
  "global_phase_steps",
  _D.global_phase_steps,
  "Dual scope: K > 0 makes the first K sampling steps the global phase, the rest local (0: by timestep).",
  flag_values=F,
)
flags.DEFINE_float(
  "global_bias", _D.global_bias, "Dual scope: logit bias on global keys in the global phase.", flag_values=F
)
flags.DEFINE_float(
  "local_bias", _D.local_bias, "Dual scope: logit bias on local keys in the local phase.", flag_values=F
)
flags.DEFINE_string(
  "video_ends", _D.video_ends, "zeros (official: zero K/V past the video's ends) or mask.", flag_values=F
)
flags.DEFINE_string(
  "global_frames",
  _D.global_frames,
  "Dual scope: video (G frames at video indices k*N/G, device-count invariant) or official (each device's "
  "evenly spaced frames, in device order, cut to G, as the official code).",
  flag_values=F,
)
flags.DEFINE_string(
  "group_norm", _D.group_norm, "global (exact statistics, device-count invariant) or local (official).", flag_values=F
)
flags.DEFINE_integer(
  "query_block", _D.query_block, "Dual scope: query frames per block (0 = automatic); memory only.", flag_values=F
)
# Devices and memory
flags.DEFINE_integer(
  "num_devices", _D.num_devices, "0 = every device of every process; K = the first K local devices.", flag_values=F
)
flags.DEFINE_string(
  "frame_chunk",
  _D.frame_chunk,
  "Frames per chunk of the UNet's per-frame layers: auto (the largest the memory plan fits on the device), "
  "0 (all local frames at once) or N.",
  flag_values=F,
)
flags.DEFINE_string(
  "decode_chunk",
  _D.decode_chunk,
  "Frames each device decodes at a time: auto (the largest of 8, 4, 2, 1 that fits) or N.",
  flag_values=F,
)
flags.DEFINE_float(
  "device_memory_gib",
  _D.device_memory_gib,
  "GiB a device may use when less than it has (a shared card; rehearsing a smaller one); 0 = what it offers.",
  flag_values=F,
)
flags.DEFINE_bool(
  "dry_run",
  False,
  "Print the memory plan (and the chunks auto would choose) for these settings and devices, then exit 0: "
  "no weights are loaded, nothing compiles.",
  flag_values=F,
)
flags.DEFINE_bool("verbose", False, "Show XLA's and absl's log lines (quiet by default).", flag_values=F)
flags.DEFINE_string(
  "compilation_cache_dir",
  _D.compilation_cache_dir,
  "JAX persistent compilation cache directory (empty = off).",
  flag_values=F,
)
flags.DEFINE_bool(
  "compile_only",
  _D.compile_only,
  "Load and compile the step and decode programs (into --compilation_cache_dir), then stop: warms the cache.",
  flag_values=F,
)
# Outputs
flags.DEFINE_string(
  "output", "outputs/video.mp4", "Video path: .mp4, .gif, or a directory (no suffix) of PNG frames.", flag_values=F
)
flags.DEFINE_float("export_fps", _D.export_fps, "Frame rate of the written video.", flag_values=F)
flags.DEFINE_string(
  "save_latents",
  _D.save_latents,
  "Also write the final latents [1, frames, h/8, w/8, 4] float32 to this .npy.",
  flag_values=F,
)
# Resume
flags.DEFINE_integer(
  "save_state_every",
  _D.save_state_every,
  "Save resumable state to --state_dir every N steps (0 = never).",
  flag_values=F,
)
flags.DEFINE_string("state_dir", _D.state_dir, "Directory for resumable state.", flag_values=F)
flags.DEFINE_string(
  "resume",
  _D.resume,
  "Continue from the state saved in this directory (same settings and device count).",
  flag_values=F,
)
flags.DEFINE_integer(
  "stop_after", _D.stop_after, "Run at most N steps now, save state and stop (0 = to the end).", flag_values=F
)
# Several hosts
flags.DEFINE_string(
  "coordinator_address", "", "host:port of process 0, for several processes (jax.distributed).", flag_values=F
)
flags.DEFINE_integer("num_processes", 1, "Processes in all (with --coordinator_address).", flag_values=F)
flags.DEFINE_integer("process_id", 0, "This process's index (with --coordinator_address).", flag_values=F)
flags.DEFINE_bool(
  "distributed",
  False,
  "jax.distributed.initialize() with JAX's auto-detection (Slurm, Open MPI, TPU, JAX_COORDINATOR_ADDRESS).",
  flag_values=F,
)

_PATH_FLAGS = ("output", "weights", "save_latents", "state_dir", "resume", "compilation_cache_dir")
_PROMPT_FLAGS = ("--prompt", "--prompts_file", "-prompt", "-prompts_file")


def _is_prompt_flag(arg: str) -> bool:
  return any(arg == p or arg.startswith(p + "=") for p in _PROMPT_FLAGS)


def help_text() -> str:
  """The module docstring without its reST markup, then every flag (with --flagfile)."""
  doc = re.sub(r":\w+:`([^`]*)`", r"\1", __doc__).replace("``", "")
  flagfile = "  --flagfile: A file of flags, one --name=value a line ('#' comments); flags after it override it."
  return f"{doc.strip()}\n\n{_models_text()}\n\nflags:\n{flagfile}\n{F.get_help(include_special_flags=False)}"


def _models_text() -> str:
  """The model presets (--model) with their kind and default clip, and the kind of the --weights given."""
  from vinf_jax import checkpoint
  from vinf_jax.config import PRESETS

  lines = [
    f"  {n}: {m.kind}; {m.video_size[0]} frames at {m.video_size[1]}x{m.video_size[2]}" for n, m in PRESETS.items()
  ]
  weights = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--weights=")]
  if weights:
    try:
      m = checkpoint.read_model_dir(weights[-1], need=())[0]
      lines.append(f"  --weights={weights[-1]}: the {m.name!r} model, {m.kind}")
    except (OSError, ValueError) as err:
      lines.append(f"  --weights={weights[-1]}: {err}")
  return "models (--model; a converted --weights directory records its own):\n" + "\n".join(lines)


PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_flagfile(path: str) -> str:
  """``path``, or for a relative path not found from here, the same path under the package's checkout
  (``configs/demo_tiny.flags`` from any directory); raises ValueError naming where it looked."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return path
  alt = os.path.join(PACKAGE_ROOT, path)
  if not os.path.isabs(path) and os.path.isfile(alt):
    return alt
  where = f"{os.path.abspath(path)}" + ("" if os.path.isabs(path) else f" or {alt}")
  what = "is a directory" if os.path.isdir(path) else "no such file"
  raise ValueError(f"--flagfile={path}: {what} ({where})")


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, except that prompts given on the command line replace the flagfiles' prompts."""
  if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
    print(help_text())
    sys.exit(0)
  if F.is_parsed():  # a second parse in one process (tests) starts from the defaults
    F.unparse_flags()
  own = any(_is_prompt_flag(a) for a in argv[1:])
  expanded, i = [argv[0]], 1
  while i < len(argv):
    a = argv[i]
    if a in ("--flagfile", "-flagfile") and i + 1 < len(argv):
      a, i = f"--flagfile={argv[i + 1]}", i + 1
    if a.startswith(("--flagfile=", "-flagfile=")):
      try:
        found = find_flagfile(a.split("=", 1)[1])
        from_file = F.read_flags_from_files([f"--flagfile={found}"], force_gnu=False)
      except UnicodeDecodeError as err:
        print(f"error: {_not_utf8(found, err)}", file=sys.stderr)
        sys.exit(2)
      except (ValueError, flags.Error, OSError) as err:
        print(f"error: {str(err).strip().splitlines()[-1].removeprefix('ERROR:: ')}", file=sys.stderr)
        sys.exit(2)
      expanded += [x for x in from_file if not (own and _is_prompt_flag(x))]
    else:
      expanded.append(a)
    i += 1
  try:
    return F(expanded)
  except flags.Error as err:
    print(f"error: {err}\nTry --helpfull.", file=sys.stderr)
    sys.exit(2)


def utf8_position(data: bytes) -> tuple[int, int] | None:
  """(line, column), both from 1, of the first byte of ``data`` that is not UTF-8; None if all of it is."""
  try:
    data.decode("utf-8")
    return None
  except UnicodeDecodeError as err:
    line = data.count(b"\n", 0, err.start) + 1
    return line, err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1


def _not_utf8(path: str, err: UnicodeDecodeError, seen: set | None = None) -> str:
  """The message for a flagfile (or one it names with --flagfile) that is not UTF-8: the file and the line."""
  seen = set() if seen is None else seen
  seen.add(os.path.realpath(path))
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError:
    return f"--flagfile={path}: not UTF-8 text ({err.reason})"
  where = utf8_position(data)
  if where:
    return f"--flagfile={path} is not UTF-8 text: line {where[0]}, column {where[1]} ({err.reason})"
  for ln in data.decode("utf-8").splitlines():  # a flagfile it names
    ln = ln.strip()
    if ln.startswith(("--flagfile=", "-flagfile=")):
      named = os.path.expanduser(ln.split("=", 1)[1])
      for inner in (named, os.path.join(os.path.dirname(path), named)):  # as absl reads it, or beside this file
        if os.path.isfile(inner) and os.path.realpath(inner) not in seen:
          msg = _not_utf8(inner, err, seen)
          if "line" in msg:
            return msg
  return f"--flagfile={path} or a file it names is not UTF-8 text ({err.reason})"


def read_prompts(path: str) -> list[str]:
  """The prompts of a text file, one a line ('#' comments and blank lines skipped); ValueError naming the
  flag and the file when it cannot be read, is not UTF-8 text or holds no prompt."""
  what = f"prompts_file={path!r}"
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as err:
    raise ValueError(f"{what}: {err.strerror or err}") from None
  except UnicodeDecodeError as err:
    with open(path, "rb") as f:
      line, col = utf8_position(f.read()) or (0, 0)
    raise ValueError(f"{what} is not a UTF-8 text file: line {line}, column {col} ({err.reason})") from None
  if "\x00" in text:
    raise ValueError(f"{what} is a binary file, not a text file of prompts")
  prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
  if not prompts:
    raise ValueError(f"{what} holds no prompt (only blank lines or '#' comments); expected one prompt per line")
  return prompts


def check_cli_flags() -> list[str]:
  """Settings only the command line can get wrong (the library takes these as arguments)."""
  e = []
  if not F.output and not F.save_latents and not F.compile_only and not F.stop_after:
    e.append(
      "output='' is empty: expected a .mp4 or .gif path or a directory for PNG frames (or --save_latents "
      "to keep only the latents)"
    )
  if F.coordinator_address:
    host, _, port = F.coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
      e.append(f"coordinator_address={F.coordinator_address!r}, expected host:port (port 1..65535), e.g. host0:1234")
    if F.num_processes < 1:
      e.append(f"num_processes={F.num_processes}, expected >= 1")
    elif not 0 <= F.process_id < F.num_processes:
      e.append(f"process_id={F.process_id}, expected 0..{F.num_processes - 1} (num_processes={F.num_processes})")
  return e


def config_from_flags() -> GenerationConfig:
  prompts = list(F.prompt)
  if F.prompts_file:
    try:
      prompts += read_prompts(os.path.expanduser(F.prompts_file))
    except ValueError as err:
      raise ValueError(f"invalid settings:\n  - {err}") from None
  fields = {f.name for f in dataclasses.fields(GenerationConfig)} - {"prompts"}
  values = {name: F[name].value for name in fields}
  for name in ("frame_chunk", "decode_chunk"):  # 'auto' or an integer (anything else: validate names it)
    v = str(values[name]).strip()
    values[name] = int(v) if v.lstrip("-").isdigit() else ("auto" if v.lower() == "auto" else v)
  for name in _PATH_FLAGS:
    values[name] = os.path.expanduser(values[name]) if values[name] else values[name]
  return GenerationConfig(prompts=tuple(prompts), **values)


def _init_distributed() -> None:
  import jax

  if not (F.coordinator_address or F.distributed):
    return
  try:  # CPU collectives across processes (tests, CPU clusters); GPUs use NCCL regardless
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):
    pass
  if F.coordinator_address:
    jax.distributed.initialize(F.coordinator_address, num_processes=F.num_processes, process_id=F.process_id)
  else:
    jax.distributed.initialize()


def quiet_logs(verbose: bool) -> None:
  """XLA's C++ log lines (the allocator's and autotuner's walls around an out-of-memory) and JAX's and absl's
  warnings stay out of the terminal unless ``verbose``: each failure is reported in one line of ours."""
  import logging as py_logging

  if verbose:
    logging.set_verbosity(logging.INFO)
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # read by XLA when it first logs: before any device use
  logging.set_verbosity(logging.ERROR)
  py_logging.getLogger("jax").setLevel(py_logging.ERROR)


def main(argv: list[str]) -> None:
  quiet_logs(F.verbose if F.is_parsed() else False)
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
    sys.exit(2)
  from vinf_jax import pipeline, video_io
  from vinf_jax.pipeline import interrupts

  bad = check_cli_flags()
  if bad:
    print("error: invalid settings:\n  - " + "\n  - ".join(bad), file=sys.stderr)
    sys.exit(2)
  _init_distributed()  # before anything touches a device (validation counts them)
  with interrupts.handled():  # after it: jax.distributed sets a SIGTERM handler of its own
    try:
      cfg = config_from_flags()
      plan = pipeline.validate(cfg)
    except ValueError as err:
      print(f"error: {err}", file=sys.stderr)
      sys.exit(2)
    if F.dry_run:
      print(dry_run_report(cfg, plan))
      return
    try:
      pipeline.generate(cfg)
    except pipeline.Interrupted as err:
      print(
        f"stopped: {err}; {'to continue' if err.state_dir else 'to start again'}: {again(err.state_dir)}",
        file=sys.stderr,
      )
      sys.exit(err.exit_code)
    except (ValueError, FileNotFoundError) as err:
      print(f"error: {err}", file=sys.stderr)
      sys.exit(2)
    except (FloatingPointError, video_io.WriteError, pipeline.OutOfMemory) as err:
      print(f"error: {err}", file=sys.stderr)
      sys.exit(1)


def again(resume: str | None) -> str:
  """This command again (``--resume=RESUME`` added, a ``--resume=`` before it dropped), for the line a stop prints."""
  args = [a for a in sys.argv[1:] if not (resume and a.startswith("--resume="))]
  return shlex.join(["python", "-m", "vinf_jax.sample", *args, *([f"--resume={resume}"] if resume else [])])


def dry_run_report(cfg: GenerationConfig, plan) -> str:
  """What --dry_run prints: the run, the memory plan (per device) and the chunks ``auto`` chose."""
  m = plan.memory
  g = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
  lim = f"{g(m.limit)} ({m.limit_source})" if m.limit is not None else "unknown (no memory statistics)"
  return "\n".join(
    [
      f"dry run: {cfg.frames} frames at {cfg.height}x{cfg.width}, {plan.model.name} in {plan.dtype}, "
      f"{cfg.sampler} {cfg.steps} steps, over {plan.num_devices} device(s): {m.frames_per_device} frames each",
      f"  frame_chunk {m.frame_chunk}{' (auto)' if cfg.frame_chunk == 'auto' else ''}, decode_chunk "
      f"{m.decode_chunk}{' (auto)' if cfg.decode_chunk == 'auto' else ''}",
      f"  weights {g(m.weights)}, latents and text {g(m.state)}, step temporaries {g(m.step_temp)}, "
      f"decode temporaries and frames {g(m.decode_temp)}",
      f"  peak {g(m.peak)} per device (step {g(m.step_peak)}, decode {g(m.decode_peak)}); the device offers {lim}",
      "fits: nothing was loaded or compiled (run without --dry_run to make the video)",
    ]
  )


def run() -> None:
  main(parse_flags(sys.argv))


if __name__ == "__main__":
  run()
