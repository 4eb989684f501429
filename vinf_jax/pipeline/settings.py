"""The settings of one video (:class:`GenerationConfig`) and their validation before anything loads.

This module holds what the command line, the web page and the library share about settings: the frozen
config whose field names are the ``vinf_jax.sample`` flags, what its defaults resolve to (guidance, dtype,
the sampler's and the temporal options' configs), and :func:`validate`, which lists every bad setting at
once (name, value, what is allowed) from the config alone: sizes, frames against the device count, the
sampler, paths and a resume directory (whose checks live with the run state, :mod:`.state`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import numpy as np

from vinf_jax import checkpoint, parallel, sampling, video_io
from vinf_jax import schedule as schedule_lib
from vinf_jax.config import PRESETS, ModelConfig, TemporalConfig, preset
from vinf_jax.pipeline import memory as memory_lib

DTYPES = ("auto", "float32", "bfloat16", "float16")
SEED_RANGE = (-(2**31), 2**31 - 1)
GUIDED_FPS = 24  # Video-Infinity's
_SAMPLER, _TEMPORAL = sampling.SamplerConfig(), TemporalConfig()


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Everything one video depends on. Field names are the ``vinf_jax.sample`` flag names.

  Attributes:
    prompts: the prompts; prompt i covers the i-th equal segment of the video.
    output: the video path: ``.mp4``, ``.gif``, or a directory (no suffix) of PNG frames. Empty: no file
      (library use; the frames are returned).
    weights: a directory written by ``python -m convert.videocrafter2``; empty: random weights of ``model``.
    model: preset for random weights ('tiny', 'videocrafter2'); with ``weights`` it must match the
      directory's model when given.
    weights_seed: seed of the random weights.
    negative_prompt: the unconditional text of classifier-free guidance (VideoCrafter2: empty).
    frames: frames of the whole video.
    height, width: video size in pixels (multiples of the VAE x UNet downsampling, 64).
    fps: the frame rate the UNet is conditioned on (VideoCrafter2: 28 for its 16 frames; Video-Infinity 24).
      None: the sampler's default (24; 'turbo': 16, T2V-Turbo's).
    seed: noise seed; the video depends only on it and the settings, not on the device count.
    sampler: 'dpmpp_sde', 'ddim' or 'turbo' (T2V-Turbo weights). steps, eta, ddim_exact_steps, turbo_origin,
      motion_scale, motion_cutoff: see SamplerConfig; steps None: the sampler's default (30; 'turbo': 4).
    guidance: see SamplerConfig; None: 12 for the guided samplers, 7.5 (the embedded w) for 'turbo'.
    attention, window, num_global, global_phase_from, local_phase_below, global_bias, local_bias,
      video_ends, global_frames, group_norm, query_block: see TemporalConfig.
    global_phase_steps: K > 0: dual-scope attention's global phase covers the first K sampling steps and the
      local phase the rest, whatever their timesteps (the thresholds become the K-th step's timestep);
      0: the timestep thresholds global_phase_from / local_phase_below (the paper's rule).
    dtype: 'auto' (bfloat16 on accelerators, float32 on CPU), 'float32', 'bfloat16' or 'float16'.
    num_devices: 0 = every device of every process; K = the first K local devices (one process).
    frame_chunk: frames per chunk of the UNet's per-frame layers (0 = all local frames at once; 'auto': the
      largest that fits the device's memory by the memory plan, :mod:`vinf_jax.pipeline.memory`).
    decode_chunk: frames each device decodes at a time ('auto': the largest of 8, 4, 2, 1 that fits).
    device_memory_gib: the memory a device may use, when less than it has (a shared card, or to rehearse a
      smaller one); 0: what the device offers.
    export_fps: frame rate of the written video.
    prompt_transition: frames over which the text embedding blends into the next prompt (0 = cut).
    save_latents: also write the final latents to this ``.npy`` path.
    save_state_every: save resumable state to ``state_dir`` every N steps (0 = never).
    state_dir: where resumable state goes.
    resume: continue from the state saved in this directory.
    stop_after: run at most this many steps in this invocation, save state and stop (0 = run to the end).
    compilation_cache_dir: JAX's persistent compilation cache (empty = off).
    compile_only: load the models and compile the step and decode programs (into the persistent cache,
      when one is set), then stop: no sampling, no output.
  """

  prompts: tuple[str, ...] = ()
  output: str = ""
  weights: str = ""
  model: str = ""
  weights_seed: int = 0
  negative_prompt: str = ""
  frames: int = 16
  height: int = 320
  width: int = 512
  fps: int | None = None
  seed: int = 0
  # The sampler's and the temporal options' own defaults, flattened (attention: Video-Infinity's dual scope).
  sampler: str = _SAMPLER.name
  steps: int | None = None
  guidance: float | None = None
  eta: float = _SAMPLER.eta
  ddim_exact_steps: bool = _SAMPLER.ddim_exact_steps
  turbo_origin: int = _SAMPLER.turbo_origin
  motion_scale: float = _SAMPLER.motion_scale
  motion_cutoff: float = _SAMPLER.motion_cutoff
  attention: str = "dual"
  window: int = _TEMPORAL.window
  num_global: int = _TEMPORAL.num_global
  global_phase_from: float = _TEMPORAL.global_phase_from
  local_phase_below: float = _TEMPORAL.local_phase_below
  global_bias: float = _TEMPORAL.global_bias
  local_bias: float = _TEMPORAL.local_bias
  video_ends: str = _TEMPORAL.video_ends
  global_frames: str = _TEMPORAL.global_frames
  group_norm: str = _TEMPORAL.group_norm
  query_block: int = _TEMPORAL.query_block
  global_phase_steps: int = 0
  dtype: str = "auto"
  num_devices: int = 0
  frame_chunk: int | str = "auto"
  decode_chunk: int | str = "auto"
  device_memory_gib: float = 0.0
  export_fps: float = 8.0
  prompt_transition: int = 0
  save_latents: str = ""
  save_state_every: int = 0
  state_dir: str = ""
  resume: str = ""
  stop_after: int = 0
  compilation_cache_dir: str = ""
  compile_only: bool = False

  def __post_init__(self):
    # None: the sampler's own defaults (T2V-Turbo's 4 steps at fps 16; the guided samplers' 30 at fps 24)
    turbo = self.sampler == "turbo"
    if self.steps is None:
      object.__setattr__(self, "steps", sampling.TURBO_STEPS if turbo else _SAMPLER.steps)
    if self.fps is None:
      object.__setattr__(self, "fps", sampling.TURBO_FPS if turbo else GUIDED_FPS)

  def resolved_guidance(self) -> float:
    if self.guidance is not None:
      return self.guidance
    return sampling.TURBO_GUIDANCE if self.sampler == "turbo" else _SAMPLER.guidance

  def sampler_config(self) -> sampling.SamplerConfig:
    """The sampler's settings, on the noise schedule of the model (its converted directory's or its preset's)."""
    skip = ("name", "guidance", "schedule")
    names = [f.name for f in dataclasses.fields(sampling.SamplerConfig) if f.name not in skip]
    kw = {n: getattr(self, n) for n in names}
    sched = model_schedule(self.weights, self.model)
    return sampling.SamplerConfig(name=self.sampler, guidance=self.resolved_guidance(), schedule=sched, **kw)

  def temporal_config(self) -> TemporalConfig:
    """The temporal options; with ``global_phase_steps`` K > 0 both phase thresholds are the K-th sampling
    step's timestep (the sampler's timesteps fall strictly), so exactly the first K steps are global."""
    names = [f.name for f in dataclasses.fields(TemporalConfig)]
    temporal = TemporalConfig(**{n: getattr(self, n) for n in names})
    k = self.global_phase_steps
    if isinstance(k, int) and k > 0:
      try:
        ts = sampling.make_plan(self.sampler_config()).timesteps
      except ValueError:  # reported by validate() with the sampler's own messages
        return temporal
      if k <= len(ts):
        t_k = float(ts[k - 1])
        temporal = dataclasses.replace(temporal, global_phase_from=t_k, local_phase_below=t_k)
    return temporal

  def resolved_dtype(self) -> str:
    if self.dtype != "auto":
      return self.dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def model_schedule(weights: str, model: str) -> schedule_lib.Schedule:
  """The noise schedule of a converted directory (``weights``) or of a preset (``model``); VideoCrafter2's when
  neither says (a directory that does not read is reported by :func:`validate`)."""
  if weights:
    try:
      stamp = os.stat(os.path.join(weights, checkpoint.CONFIG_FILE)).st_mtime_ns
      return _dir_schedule(os.path.abspath(weights), stamp)
    except (OSError, ValueError, KeyError):
      return schedule_lib.VIDEOCRAFTER2
  return PRESETS[model].schedule if model in PRESETS else schedule_lib.VIDEOCRAFTER2


@functools.lru_cache(maxsize=16)
def _dir_schedule(path: str, stamp: int) -> schedule_lib.Schedule:
  del stamp  # part of the cache key: an edited config.json is read again
  return checkpoint.read_model_dir(path, need=())[0].schedule


@dataclasses.dataclass(frozen=True)
class Resolved:
  """What validation resolved: the model config, the device count, where weights come from, and the memory
  plan with the chunks it chose (``frame_chunk``, ``decode_chunk``: the values the run uses)."""

  model: ModelConfig
  num_devices: int
  dtype: str
  tokenizer_dir: str | None
  memory: memory_lib.MemoryPlan | None = None

  @property
  def frame_chunk(self) -> int:
    return self.memory.frame_chunk

  @property
  def decode_chunk(self) -> int:
    return self.memory.decode_chunk


def _memory_inputs(cfg: GenerationConfig, model: ModelConfig, num_devices: int) -> dict:
  return dict(
    model=model.with_dtype(cfg.resolved_dtype()),
    frames=cfg.frames,
    num_devices=num_devices,
    height=cfg.height,
    width=cfg.width,
    guided=cfg.sampler != "turbo",
    prompts=len(cfg.prompts),
  )


def plan_memory(cfg: GenerationConfig, model: ModelConfig, num_devices: int) -> memory_lib.MemoryPlan:
  """The memory plan of valid settings on ``num_devices`` devices, ``auto`` chunks chosen for the device."""
  limit, source = memory_lib.device_limit(cfg.device_memory_gib)
  kw = _memory_inputs(cfg, model, num_devices)
  return memory_lib.choose(frame_chunk=cfg.frame_chunk, decode_chunk=cfg.decode_chunk, limit=limit, source=source, **kw)


def latent_shape(cfg: GenerationConfig, model: ModelConfig) -> tuple[int, int, int, int, int]:
  """``[1, frames, height/8, width/8, channels]``: the shape of the video's latents."""
  f = model.vae.downsample_factor
  return (1, cfg.frames, cfg.height // f, cfg.width // f, model.unet.in_channels)


def validate(cfg: GenerationConfig) -> Resolved:
  """Raise ValueError listing every bad setting (name, value, what is allowed); return what was resolved."""
  from vinf_jax.pipeline import state

  e: list[str] = []
  model = _check_model(cfg, e)
  _check_text(cfg, e)
  _check_video(cfg, model, e)
  _check_sampler(cfg, model, e)
  temporal = cfg.temporal_config()
  try:
    temporal.validate()
  except ValueError as err:
    e += _listed(err)
    temporal = None
  if cfg.dtype not in DTYPES:
    e.append(f"dtype={cfg.dtype!r}, expected one of {', '.join(DTYPES)}")
  elif cfg.dtype == "float16" and jax.default_backend() == "cpu":
    e.append("dtype='float16' does not run on CPU (XLA:CPU has no float16 matmul); use float32 or bfloat16")
  num_devices = _check_devices(cfg, e)
  if temporal is not None and num_devices and isinstance(cfg.frames, int) and cfg.frames >= 1:
    try:
      parallel.check_frames(cfg.frames, num_devices, temporal)
    except ValueError as err:
      e += _listed(err) + [_frames_hint(cfg.frames, num_devices, temporal)]
  _check_counts(cfg, e)
  _check_paths(cfg, e)
  state.check_state_dirs(cfg, e)
  if cfg.compilation_cache_dir:
    try:
      video_io.check_writable(cfg.compilation_cache_dir, "compilation_cache_dir", reuse=True)
    except ValueError as err:
      e.append(str(err))
  if e:
    raise ValueError("invalid settings:\n  - " + "\n  - ".join(e))
  mem = plan_memory(cfg, model, num_devices)
  refusal = memory_lib.check_fits(mem, **_memory_inputs(cfg, model, num_devices))
  if refusal:
    raise ValueError(f"invalid settings:\n  - {refusal}")
  tok = os.path.join(cfg.weights, "tokenizer") if cfg.weights else None
  return Resolved(model=model, num_devices=num_devices, dtype=cfg.resolved_dtype(), tokenizer_dir=tok, memory=mem)


def _listed(err: ValueError) -> list[str]:
  """The items of a ``"...:\\n  - a\\n  - b"`` ValueError (the sampler's and temporal options' own)."""
  return [ln.strip()[2:] for ln in str(err).splitlines()[1:]]


def _check_text(cfg: GenerationConfig, e: list[str]) -> None:
  if not cfg.prompts:
    e.append("prompts: none given; pass at least one --prompt (or --prompts_file)")
  for i, p in enumerate(cfg.prompts):
    if not isinstance(p, str) or not p.strip():
      e.append(f"prompt {i + 1} of {len(cfg.prompts)} is empty ({p!r}); every prompt needs text")
  if not isinstance(cfg.negative_prompt, str):
    e.append(f"negative_prompt={cfg.negative_prompt!r}, expected a string")


def _check_video(cfg: GenerationConfig, model: ModelConfig | None, e: list[str]) -> None:
  if not (isinstance(cfg.frames, int) and cfg.frames >= 1):
    e.append(f"frames={cfg.frames!r}, expected an integer >= 1")
  if model is not None:
    f = model.vae.downsample_factor * model.unet.downsample_factor
    for name in ("height", "width"):
      v = getattr(cfg, name)
      if not (isinstance(v, int) and v > 0 and v % f == 0):
        e.append(
          f"{name}={v!r} is not a positive multiple of {f} (the VAE downsamples by "
          f"{model.vae.downsample_factor} and the UNet by {model.unet.downsample_factor} more); "
          f"e.g. {max(f, round(v / f) * f) if isinstance(v, int | float) else 320}"
        )
  if not (isinstance(cfg.seed, int) and SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1]):
    e.append(f"seed={cfg.seed!r}, expected an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]} (the noise key is int32)")
  if not (isinstance(cfg.fps, int) and cfg.fps >= 1):
    e.append(f"fps={cfg.fps!r}, expected an integer >= 1 (the frame rate the UNet is conditioned on)")
  if not (np.isfinite(cfg.export_fps) and cfg.export_fps > 0):
    e.append(f"export_fps={cfg.export_fps!r}, expected > 0")


def _check_sampler(cfg: GenerationConfig, model: ModelConfig | None, e: list[str]) -> None:
  """The sampler's own checks, reported with the flag names, and whether it suits the model."""
  if cfg.sampler not in sampling.SAMPLERS:
    e.append(f"sampler={cfg.sampler!r}, expected one of {', '.join(sampling.SAMPLERS)}")
  else:
    try:
      cfg.sampler_config().validate()
    except ValueError as err:
      e += _listed(err)
  k = cfg.global_phase_steps
  if not (isinstance(k, int) and k >= 0):
    e.append(f"global_phase_steps={k!r}, expected an integer >= 0 (0: the timestep thresholds)")
  elif k and cfg.sampler in sampling.SAMPLERS:
    try:
      n = sampling.num_steps(sampling.make_plan(cfg.sampler_config()))
      if k > n:
        e.append(f"global_phase_steps={k} is more than the {n} sampling steps of {cfg.sampler!r} {cfg.steps} steps")
    except ValueError:
      pass  # the sampler's own errors are listed above
  if model is None or cfg.sampler not in sampling.SAMPLERS:
    return
  turbo_model = bool(model.unet.time_cond_proj_dim)
  source = f"weights={cfg.weights!r}" if cfg.weights else f"model={cfg.model!r}"
  if cfg.sampler == "turbo" and not turbo_model:
    e.append(
      f"sampler='turbo' needs T2V-Turbo weights (a UNet with time_cond_proj), but {source} is "
      f"{model.name!r}; convert t2v_turbo_vc2.pt (or --turbo_lora / --turbo_unet), or use a guided sampler"
    )
  elif cfg.sampler != "turbo" and turbo_model:
    e.append(
      f"{source} is a T2V-Turbo model ({model.name!r}: guidance distilled into the UNet): use sampler='turbo' "
      f"(not {cfg.sampler!r}, whose classifier-free guidance such a UNet was not trained for)"
    )


def _check_counts(cfg: GenerationConfig, e: list[str]) -> None:
  for name in ("save_state_every", "stop_after", "prompt_transition", "weights_seed"):
    v = getattr(cfg, name)
    if not (isinstance(v, int) and v >= 0):
      e.append(f"{name}={v!r}, expected an integer >= 0")
  fc, dc = cfg.frame_chunk, cfg.decode_chunk
  if fc != memory_lib.AUTO and not (isinstance(fc, int) and not isinstance(fc, bool) and fc >= 0):
    e.append(f"frame_chunk={fc!r}, expected 'auto' or an integer >= 0 (0 = every local frame at once)")
  if dc != memory_lib.AUTO and not (isinstance(dc, int) and not isinstance(dc, bool) and dc >= 1):
    e.append(f"decode_chunk={dc!r}, expected 'auto' or an integer >= 1")
  gib = cfg.device_memory_gib
  if not (isinstance(gib, int | float) and not isinstance(gib, bool) and np.isfinite(gib) and gib >= 0):
    e.append(f"device_memory_gib={gib!r}, expected a number of GiB >= 0 (0 = what the device offers)")
  if cfg.prompts and isinstance(cfg.frames, int) and cfg.frames >= 1:
    seg = cfg.frames / len(cfg.prompts)
    if seg < 1:
      e.append(f"{len(cfg.prompts)} prompts for frames={cfg.frames}: at most one prompt per frame")
    elif isinstance(cfg.prompt_transition, int) and len(cfg.prompts) > 1 and cfg.prompt_transition > seg:
      e.append(
        f"prompt_transition={cfg.prompt_transition} is longer than a prompt's segment ({seg:g} frames = "
        f"frames {cfg.frames} / {len(cfg.prompts)} prompts); expected 0..{math.floor(seg)}"
      )


def _frames_hint(frames: int, num_devices: int, temporal: TemporalConfig) -> str:
  step = parallel.lcm_frames(num_devices, temporal)
  ok = []
  for n in range(step, frames + 64 * step + 1, step):
    try:
      parallel.check_frames(n, num_devices, temporal)
      ok.append(n)
    except ValueError:
      continue
  below = [n for n in ok if n < frames][-1:]
  above = [n for n in ok if n > frames][:1]
  near = " or ".join(str(n) for n in below + above) or "none nearby: change the temporal settings"
  return f"frames that work on {num_devices} device(s) with these temporal settings: {near}"


def _check_model(cfg: GenerationConfig, e: list[str]) -> ModelConfig | None:
  if cfg.model and cfg.model not in PRESETS:
    e.append(f"model={cfg.model!r}, expected one of {', '.join(sorted(PRESETS))}")
    return None
  if not cfg.weights:
    if not cfg.model:
      e.append("weights: no converted weights directory given (--weights), and no --model preset for random weights")
      return None
    return preset(cfg.model)
  try:
    model, _ = checkpoint.read_model_dir(cfg.weights)
  except (FileNotFoundError, ValueError, KeyError) as err:
    e.append(f"weights={cfg.weights!r}: {err}")
    return None
  if cfg.model and model.name != cfg.model:
    e.append(f"weights={cfg.weights!r} hold the model {model.name!r}, but model={cfg.model!r}")
  return model


def _check_devices(cfg: GenerationConfig, e: list[str]) -> int:
  if not (isinstance(cfg.num_devices, int) and cfg.num_devices >= 0):
    e.append(f"num_devices={cfg.num_devices!r}, expected an integer >= 0 (0 = all devices)")
    return 0
  if cfg.num_devices == 0:
    return jax.device_count()
  if jax.process_count() > 1:
    e.append(f"num_devices={cfg.num_devices}: with {jax.process_count()} processes every device is used; pass 0")
    return 0
  if cfg.num_devices > jax.local_device_count():
    e.append(f"num_devices={cfg.num_devices}, but this machine has {jax.local_device_count()} devices")
    return 0
  return cfg.num_devices


def _check_paths(cfg: GenerationConfig, e: list[str]) -> None:
  """The output paths: each writable (a directory of PNGs, or a file and its JSON sidecar)."""
  if cfg.output:
    try:
      kind = video_io.output_kind(cfg.output)
      video_io.check_writable(cfg.output, "output", directory=kind == "png")
      video_io.check_writable(video_io.sidecar_path(cfg.output), "output (its JSON sidecar)")
    except ValueError as err:
      e.append(str(err))
  if cfg.save_latents:
    if not cfg.save_latents.endswith(".npy"):
      e.append(f"save_latents={cfg.save_latents!r}, expected a path ending in .npy")
    else:
      try:
        video_io.check_writable(cfg.save_latents, "save_latents")
      except ValueError as err:
        e.append(str(err))
