"""Text -> long video: the library behind ``python -m vinf_jax.sample`` and the Colab notebook.

One call, :func:`generate`, runs the whole job from a frozen :class:`GenerationConfig`:

1. :func:`validate` checks every setting (sizes, frames against the device count, sampler, paths, the
   weights directory, a resume directory) before anything is loaded or compiled;
2. the weights are loaded (or, for the demo and benchmarks, random ones built), the prompts tokenised and
   encoded once, and each frame's text embedding laid out (prompt segments with linear transitions);
3. x_T is drawn per global frame on the device that holds the frame; the clip-parallel guided step
   (:func:`vinf_jax.parallel.make_denoiser`: one XLA program, both CFG branches) runs once per sampling
   step with a progress line (compile time reported apart), optionally saving resumable state;
4. the VAE decodes each device's frames in chunks on that device; the frames are gathered and process
   0 writes the video, its JSON sidecar and optionally the latents, each under a temporary name that is
   renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vinf_jax import checkpoint, parallel, sampling, video_io
from vinf_jax.config import PRESETS, ModelConfig, TemporalConfig, preset

DTYPES = ("auto", "float32", "bfloat16", "float16")
SEED_RANGE = (-(2**31), 2**31 - 1)
STATE_META = "run.json"
STATE_PREFIX = "step_"
STATE_CHECKSUMS = "checksums.json"
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
    seed: noise seed; the video depends only on it and the settings, not on the device count.
    sampler: 'dpmpp_sde', 'ddim' or 'turbo' (T2V-Turbo weights). steps, eta, ddim_exact_steps, turbo_origin,
      motion_scale, motion_cutoff: see SamplerConfig.
    guidance: see SamplerConfig; None: 12 for the guided samplers, 7.5 (the embedded w) for 'turbo'.
    attention, window, num_global, global_phase_from, local_phase_below, global_bias, local_bias,
      video_ends, global_frames, group_norm, query_block: see TemporalConfig.
    global_phase_steps: K > 0: dual-scope attention's global phase covers the first K sampling steps and the
      local phase the rest, whatever their timesteps (the thresholds become the K-th step's timestep);
      0: the timestep thresholds global_phase_from / local_phase_below (the paper's rule).
    dtype: 'auto' (bfloat16 on accelerators, float32 on CPU), 'float32', 'bfloat16' or 'float16'.
    num_devices: 0 = every device of every process; K = the first K local devices (one process).
    frame_chunk: frames per chunk of the UNet's per-frame layers (0 = all local frames at once).
    decode_chunk: frames each device decodes at a time.
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
  fps: int = 24
  seed: int = 0
  # The sampler's and the temporal options' own defaults, flattened (attention: Video-Infinity's dual scope).
  sampler: str = _SAMPLER.name
  steps: int = _SAMPLER.steps
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
  frame_chunk: int = 0
  decode_chunk: int = 4
  export_fps: float = 8.0
  prompt_transition: int = 0
  save_latents: str = ""
  save_state_every: int = 0
  state_dir: str = ""
  resume: str = ""
  stop_after: int = 0
  compilation_cache_dir: str = ""
  compile_only: bool = False

  def resolved_guidance(self) -> float:
    if self.guidance is not None:
      return self.guidance
    return sampling.TURBO_GUIDANCE if self.sampler == "turbo" else _SAMPLER.guidance

  def sampler_config(self) -> sampling.SamplerConfig:
    names = [f.name for f in dataclasses.fields(sampling.SamplerConfig) if f.name not in ("name", "guidance")]
    kw = {n: getattr(self, n) for n in names}
    return sampling.SamplerConfig(name=self.sampler, guidance=self.resolved_guidance(), **kw)

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


@dataclasses.dataclass
class GenerationResult:
  """What :func:`generate` returns (on every process; ``frames`` only where they were gathered).

  Attributes:
    frames: uint8 ``[frames, height, width, 3]``, or None when the run stopped early (``stop_after``).
    latents: float32 ``[1, frames, height/8, width/8, 4]``, the final latents as the UNet sees them
      (``scale_factor * z``), or None when the run stopped early.
    output: the written video's path, or None.
    sidecar: the JSON sidecar's content.
    steps_done: sampling steps completed (of ``num_steps``).
    num_steps: sampling steps of the plan.
  """

  frames: np.ndarray | None
  latents: np.ndarray | None
  output: str | None
  sidecar: dict
  steps_done: int
  num_steps: int


class Cancelled(RuntimeError):
  """:func:`generate` stopped because its ``should_stop()`` returned True; nothing was written."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What :func:`generate` tells its ``on_step`` callback after each sampling step (as in its progress line).

  Attributes:
    step: sampling steps done (1 .. num_steps; a resumed run starts past 1).
    num_steps: sampling steps of the plan.
    timestep: the UNet timestep of the step just done.
    seconds_per_step: mean time of this run's steps so far.
    elapsed_s: time since this run's first step began.
    eta_s: the estimated time to the run's last step.
  """

  step: int
  num_steps: int
  timestep: int
  seconds_per_step: float
  elapsed_s: float
  eta_s: float


def _log0(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Validation: everything that can be checked before loading weights or compiling.


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What validation resolved: the model config, the device count, where weights come from."""

  model: ModelConfig
  num_devices: int
  dtype: str
  tokenizer_dir: str | None


def validate(cfg: GenerationConfig) -> _Plan:
  """Raise ValueError listing every bad setting (name, value, what is allowed); return what was resolved."""
  e: list[str] = []
  model = _check_model(cfg, e)

  if not cfg.prompts:
    e.append("prompts: none given; pass at least one --prompt (or --prompts_file)")
  for i, p in enumerate(cfg.prompts):
    if not isinstance(p, str) or not p.strip():
      e.append(f"prompt {i + 1} of {len(cfg.prompts)} is empty ({p!r}); every prompt needs text")
  if not isinstance(cfg.negative_prompt, str):
    e.append(f"negative_prompt={cfg.negative_prompt!r}, expected a string")

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

  # sampler: report with the flag names
  if cfg.sampler not in sampling.SAMPLERS:
    e.append(f"sampler={cfg.sampler!r}, expected one of {', '.join(sampling.SAMPLERS)}")
  else:
    try:
      cfg.sampler_config().validate()
    except ValueError as err:
      e += [ln.strip()[2:] for ln in str(err).splitlines()[1:]]
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
  if model is not None and cfg.sampler in sampling.SAMPLERS:
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
  temporal = cfg.temporal_config()
  try:
    temporal.validate()
  except ValueError as err:
    e += [ln.strip()[2:] for ln in str(err).splitlines()[1:]]
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
      e += [ln.strip()[2:] for ln in str(err).splitlines()[1:]] + [_frames_hint(cfg.frames, num_devices, temporal)]

  for name in ("frame_chunk", "save_state_every", "stop_after", "prompt_transition", "weights_seed"):
    v = getattr(cfg, name)
    if not (isinstance(v, int) and v >= 0):
      e.append(f"{name}={v!r}, expected an integer >= 0")
  if not (isinstance(cfg.decode_chunk, int) and cfg.decode_chunk >= 1):
    e.append(f"decode_chunk={cfg.decode_chunk!r}, expected an integer >= 1")
  if cfg.prompts and isinstance(cfg.frames, int) and cfg.frames >= 1:
    seg = cfg.frames / len(cfg.prompts)
    if seg < 1:
      e.append(f"{len(cfg.prompts)} prompts for frames={cfg.frames}: at most one prompt per frame")
    elif isinstance(cfg.prompt_transition, int) and len(cfg.prompts) > 1 and cfg.prompt_transition > seg:
      e.append(
        f"prompt_transition={cfg.prompt_transition} is longer than a prompt's segment ({seg:g} frames = "
        f"frames {cfg.frames} / {len(cfg.prompts)} prompts); expected 0..{math.floor(seg)}"
      )

  _check_paths(cfg, e)
  if cfg.compilation_cache_dir:
    try:
      video_io.check_writable(cfg.compilation_cache_dir, "compilation_cache_dir", reuse=True)
    except ValueError as err:
      e.append(str(err))
  if e:
    raise ValueError("invalid settings:\n  - " + "\n  - ".join(e))
  tok = os.path.join(cfg.weights, "tokenizer") if cfg.weights else None
  return _Plan(model=model, num_devices=num_devices, dtype=cfg.resolved_dtype(), tokenizer_dir=tok)


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
  state_dir = cfg.state_dir or cfg.resume
  if (cfg.save_state_every or cfg.stop_after) and not state_dir:
    e.append("save_state_every / stop_after need state_dir (or resume) to save the state in")
  if state_dir and (cfg.save_state_every or cfg.stop_after or cfg.state_dir):
    try:
      video_io.check_writable(state_dir, "state_dir" if cfg.state_dir else "resume", reuse=True)
    except ValueError as err:
      e.append(str(err))
  if cfg.state_dir and os.path.isdir(cfg.state_dir):
    if _latest_state(cfg.state_dir) and os.path.abspath(cfg.state_dir) != os.path.abspath(cfg.resume or "//"):
      e.append(
        f"state_dir={cfg.state_dir!r} already holds saved state: pass resume={cfg.state_dir!r} to continue it, "
        "or choose an empty directory"
      )
  if cfg.resume:
    if not os.path.isdir(cfg.resume) or not os.path.isfile(os.path.join(cfg.resume, STATE_META)):
      e.append(f"resume={cfg.resume!r} is not a state directory (no {STATE_META}); expected one written by --state_dir")
    elif _latest_state(cfg.resume) is None:
      e.append(f"resume={cfg.resume!r} holds no completed state checkpoint")
    else:
      try:
        saved = _read_fingerprint(cfg.resume)
      except ValueError as err:
        e.append(str(err))
        return
      now = json.loads(json.dumps(_fingerprint(cfg)))
      saved = {"global_frames": "video"} | saved  # states saved before the setting existed
      diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
      if diff:
        e.append(
          f"resume={cfg.resume!r} was saved by a run with other settings: "
          + "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
        )


# ------------------------------------------------------------------------------------------------
# Prompts over frames


def prompt_weights(num_prompts: int, frames: int, transition: int = 0) -> np.ndarray:
  """``[frames, num_prompts]`` float32 weights of each prompt's embedding in each frame's text.

  Prompt i covers frames ``[i*N/P, (i+1)*N/P)`` (frame f belongs to prompt ``floor(f * P / N)``), so the
  segments depend only on the frame count, not on the devices. With ``transition = K > 0`` the weight
  ramps linearly across each boundary b over the K frames around it: frame f (centre ``f + 0.5``) gives
  the next prompt ``clip((f + 0.5 - b) / K + 0.5, 0, 1)``. Rows sum to 1; at most two prompts mix.
  """
  if num_prompts < 1 or frames < 1:
    raise ValueError(f"num_prompts={num_prompts} and frames={frames} must be >= 1")
  c = np.arange(frames, dtype=np.float64) + 0.5
  bounds = np.arange(1, num_prompts) * frames / num_prompts  # [P-1]
  if transition > 0:
    up = np.clip((c[:, None] - bounds[None]) / transition + 0.5, 0.0, 1.0)  # [N, P-1]: past boundary i
  else:
    up = (c[:, None] - 0.5 >= bounds[None]).astype(np.float64)  # frame f starts at or past b
  ones, zeros = np.ones((frames, 1)), np.zeros((frames, 1))
  cum = np.concatenate([ones, up, zeros], axis=1)  # [N, P+1]: "at or past the start of prompt j"
  return (cum[:, :-1] - cum[:, 1:]).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _apply_text_encoder(graphdef, params, tokens):
  from flax import nnx

  return nnx.merge(graphdef, params)(tokens)


def encode_prompts(text_encoder, tokenize, prompts: list[str]) -> np.ndarray:
  """``[len(prompts), 77, width]`` float32 penultimate-layer features (one jitted call).

  The program is JAX's to keep (the structure is a static argument): the next request with as many prompts
  reuses it. A new ``jax.jit`` per call compiled the text encoder again for every video (1.6 s a request of
  the page on an H200, a third of a 64-frame 10-step request).
  """
  from flax import nnx

  tokens = np.asarray(tokenize(list(prompts)), np.int32)
  graphdef, params = nnx.split(text_encoder)
  return np.asarray(_apply_text_encoder(graphdef, params, tokens), np.float32)


def frame_contexts(emb: np.ndarray, weights: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """``[1, N, 77, C]`` per-frame text, split over the mesh; each shard is computed where it lives."""
  n = weights.shape[0]
  shape = (1, n, *emb.shape[1:])
  sharding = jax.sharding.NamedSharding(mesh, parallel.frames_spec())

  def shard(idx):
    w = weights[idx[1]]  # [t, P]: only this shard's frames
    return np.einsum("tp,psc->tsc", w, emb).astype(np.float32)[None]

  return jax.make_array_from_callback(shape, sharding, shard)


# ------------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Models:
  """The loaded models, plus the compiled programs of the last settings they ran with (see ``generate``)."""

  config: ModelConfig
  unet: object
  vae: object
  text_encoder: object
  tokenize: Callable
  compiled: dict = dataclasses.field(default_factory=dict, repr=False)


def load_models(
  cfg: GenerationConfig,
  plan: _Plan | None = None,
  log: Callable[[str], None] = _log0,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> Models:
  """The UNet and VAE in the run's dtype, the text encoder in float32, and the tokenizer.

  The UNet and VAE are placed replicated over ``mesh`` (default: the mesh of ``cfg.num_devices``), where
  the sampling programs use them without a copy. The text encoder runs once per video on a few prompts,
  so it lives on the host's CPU device and takes no accelerator memory. ``plan`` is what :func:`validate`
  returned for ``cfg`` (validated here when None).
  """
  plan = plan or validate(cfg)
  from vinf_jax import tokenizer as tok_lib
  from vinf_jax.models import text_encoder, unet3d, vae

  mesh = mesh or parallel.make_mesh(cfg.num_devices or None)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  host = jax.sharding.SingleDeviceSharding(host_device())
  model = plan.model.with_dtype(plan.dtype)
  text_cfg = dataclasses.replace(model.text, dtype="float32", param_dtype="float32")  # small; keep it exact
  if not cfg.weights:
    log(f"random weights of the {model.name!r} model (seed {cfg.weights_seed}): the video is noise-like")
    return Models(
      config=model,
      unet=random_model(unet3d.UNet3D, model.unet, cfg.weights_seed, sharding=rep),
      vae=random_model(vae.AutoencoderKL, model.vae, cfg.weights_seed + 1, sharding=rep),
      text_encoder=random_model(text_encoder.TextEncoder, text_cfg, cfg.weights_seed + 2, sharding=host),
      tokenize=tok_lib.ByteTokenizer(model.text.context_length),
    )
  path = lambda c: os.path.join(cfg.weights, c)
  return Models(
    config=model,
    unet=checkpoint.load_params(path("unet"), make_abstract=lambda: unet3d.abstract(model.unet), sharding=rep),
    vae=checkpoint.load_params(path("vae"), make_abstract=lambda: vae.abstract(model.vae), sharding=rep),
    text_encoder=checkpoint.load_params(
      path("text_encoder"), make_abstract=lambda: text_encoder.abstract(text_cfg), sharding=host
    ),
    tokenize=tok_lib.load_tokenizer(plan.tokenizer_dir, model.text.context_length),
  )


def host_device():
  """The host's CPU device (the first accelerator when JAX runs without a CPU backend)."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the first accelerator then
    return jax.local_devices()[0]


def random_model(cls, cfg, seed: int, *, sharding: jax.sharding.Sharding | None = None):
  """``cls(cfg)`` with random weights drawn on the host with numpy (demo, benchmarks, tests).

  Flax's initialisers run op by op are slow for a thousand parameters (and a jitted initialiser is slower
  still to compile on CPU), so the weights are drawn here: kernels ``N(0, 1 / fan_in)`` (fan-in = every
  axis but the last; the variance of Flax's default LeCun-normal), embeddings ``N(0, 0.02^2)``, the
  position embedding ``N(0, 0.01^2)``, norm scales 1 and biases 0. Deterministic for a seed.
  """
  from flax import nnx

  from vinf_jax.models import abstract_model

  graphdef, state = nnx.split(abstract_model(cls, cfg))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      x = np.ones(a.shape, np.float32)
    elif name == "bias":
      x = np.zeros(a.shape, np.float32)
    else:
      std = {"embedding": 0.02, "positional_embedding": 0.01}.get(name)
      std = std or 1.0 / math.sqrt(max(1, math.prod(a.shape[:-1])))
      x = rng.standard_normal(a.shape, dtype=np.float32) * np.float32(std)
    x = x.astype(a.dtype)  # ml_dtypes: numpy casts to bfloat16 too
    return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# Decoding on the mesh


def make_decoder(vae_model, mesh: jax.sharding.Mesh, chunk: int):
  """``latents [B, N, h, w, c] (split over frames) -> uint8 frames [B, N, H, W, 3]`` decoded where they lie."""
  from flax import nnx

  from vinf_jax.models import vae as vae_lib

  graphdef, params = nnx.split(vae_model)
  params = jax.tree.map(lambda a: parallel.on_mesh(a, mesh), params)
  P = jax.sharding.PartitionSpec

  def body(params, z):  # z: [B, T, h, w, c] local frames
    x = vae_lib.decode_in_chunks(nnx.merge(graphdef, params), z, chunk)  # [B, T, H, W, 3] float32
    return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)  # as video_io.to_uint8

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), parallel.frames_spec()), out_specs=parallel.frames_spec()))
  return params, fn


def _decoder(models: Models, mesh: jax.sharding.Mesh, latent_shape, chunk: int, x: jax.Array):
  """(vae_params, compiled decode) for latents like ``x``, compiled once per (mesh, shape, chunk)."""
  key = _decode_key(mesh, latent_shape, chunk)
  if models.compiled.get("decode_key") != key:
    models.compiled.pop("decode", None)
    vae_params, decode = make_decoder(models.vae, mesh, chunk)
    decode_c = decode.lower(vae_params, x).compile(parallel.compiler_options(mesh.size))
    models.compiled.update(decode_key=key, decode=(vae_params, decode_c))
  return models.compiled["decode"]


# ------------------------------------------------------------------------------------------------
# Resumable state


def _fingerprint(cfg: GenerationConfig) -> dict:
  """The settings a saved state depends on (a resumed run must match them all)."""
  keep = (
    "prompts negative_prompt weights model weights_seed frames height width fps seed sampler steps guidance eta "
    "ddim_exact_steps attention window num_global global_phase_from local_phase_below global_bias local_bias "
    "video_ends global_frames group_norm query_block dtype num_devices prompt_transition"
  ).split()
  d = {k: getattr(cfg, k) for k in keep}
  d["prompts"] = list(d["prompts"])
  d["weights"] = os.path.abspath(d["weights"]) if d["weights"] else ""
  d["dtype"] = cfg.resolved_dtype()
  d["guidance"] = cfg.resolved_guidance()
  # settings newer than the first saved states: recorded only where they matter, so those states still resume
  if cfg.sampler == "turbo":
    d.update(turbo_origin=cfg.turbo_origin, motion_scale=cfg.motion_scale, motion_cutoff=cfg.motion_cutoff)
  if cfg.global_phase_steps:
    d["global_phase_steps"] = cfg.global_phase_steps
  d["num_devices"] = cfg.num_devices or jax.device_count()
  return d


def _saved_states(state_dir: str) -> list[str]:
  """The complete state checkpoints in ``state_dir``, newest first."""
  if not os.path.isdir(state_dir):
    return []
  # orbax finalises a checkpoint by renaming its temporary directory: only complete ones carry the name.
  steps = [n for n in os.listdir(state_dir) if n.startswith(STATE_PREFIX) and n[len(STATE_PREFIX) :].isdigit()]
  steps.sort(key=lambda n: int(n[len(STATE_PREFIX) :]), reverse=True)
  return [os.path.join(state_dir, n) for n in steps]


def _latest_state(state_dir: str) -> str | None:
  states = _saved_states(state_dir)
  return states[0] if states else None


def _read_fingerprint(state_dir: str) -> dict:
  """The settings ``run.json`` of a state directory records; ValueError naming the directory and the fault."""
  meta = os.path.join(state_dir, STATE_META)
  try:
    with open(meta, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(
      f"resume={state_dir!r}: {STATE_META} cannot be read (truncated or damaged?): {video_io.one_line(err)}"
    ) from None
  if not (isinstance(saved, dict) and isinstance(saved.get("fingerprint"), dict)):
    raise ValueError(f"resume={state_dir!r}: {STATE_META} holds no 'fingerprint' object (not written by vinf_jax?)")
  return saved["fingerprint"]


def _state_arrays(state: sampling.SamplerState) -> dict:
  return {"x": state.x, "x0": state.x0, "i": state.i}


def _checksums(arrays: dict) -> dict:
  """sha256 of each array's bytes (gathered whole on every process), with its shape and dtype."""
  import hashlib

  out = {}
  for k, a in arrays.items():
    h = np.ascontiguousarray(parallel.gather_to_host(a))
    out[k] = {"sha256": hashlib.sha256(h.tobytes()).hexdigest(), "shape": list(h.shape), "dtype": str(h.dtype)}
  return out


def _save_state(state_dir: str, state: sampling.SamplerState, cfg: GenerationConfig) -> str:
  """Save ``state`` as ``state_dir/step_NNNNN`` with a checksum per array; keep it and the previous state.

  Raises :class:`vinf_jax.video_io.WriteError` (the partial checkpoint removed) when the save fails.
  """
  import orbax.checkpoint as ocp

  i = int(np.asarray(state.i))
  path = os.path.abspath(os.path.join(state_dir, f"{STATE_PREFIX}{i:05d}"))
  arrays = _state_arrays(state)
  sums = _checksums(arrays)
  try:
    if jax.process_index() == 0:
      os.makedirs(state_dir, exist_ok=True)
      meta = os.path.join(state_dir, STATE_META)
      if not os.path.exists(meta):
        video_io.write_json(meta, {"fingerprint": _fingerprint(cfg)})
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, arrays, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
      video_io.write_json(os.path.join(path, STATE_CHECKSUMS), {"step": i, "arrays": sums})
  except Exception as err:
    if jax.process_index() == 0:
      for n in os.listdir(state_dir) if os.path.isdir(state_dir) else []:
        if n == os.path.basename(path) or n.startswith(os.path.basename(path) + "."):  # with orbax's tmp dirs
          shutil.rmtree(os.path.join(state_dir, n), ignore_errors=True)
    raise video_io.WriteError(
      f"could not save the state of step {i} in state_dir={state_dir!r}: {video_io.one_line(err)}"
    ) from err
  if jax.process_index() == 0:
    # keep this state and the newest one before it (the fallback when this one is damaged); newer ones are
    # what a resume from an older state (after a damaged newest one) has replaced
    older = [p for p in _saved_states(state_dir) if int(os.path.basename(p)[len(STATE_PREFIX) :]) < i]
    keep = {path} | set(older[:1])
    for n in os.listdir(state_dir):
      old = os.path.abspath(os.path.join(state_dir, n))
      if n.startswith(STATE_PREFIX) and old not in keep:
        shutil.rmtree(old, ignore_errors=True)
  return path


def _restore_state(
  state_dir: str, mesh: jax.sharding.Mesh, latent_shape, log: Callable[[str], None] = _log0
) -> sampling.SamplerState:
  """The newest saved state of ``state_dir`` whose checksums hold, else the one before it with a warning;
  ValueError naming the directory, each step and what is wrong when none can be used."""
  problems = []
  for path in _saved_states(state_dir):
    step = int(os.path.basename(path)[len(STATE_PREFIX) :])
    try:
      state = _restore_checked(path, step, mesh, latent_shape)
    except ValueError as err:
      problems.append(f"step {step} ({os.path.basename(path)}): {err}")
      continue
    if problems:
      log(f"warning: resume={state_dir!r}: {'; '.join(problems)}; resuming from step {step} instead")
    return state
  if not problems:
    raise ValueError(f"resume={state_dir!r} holds no completed state checkpoint")
  raise ValueError(f"resume={state_dir!r} holds no usable state: " + "; ".join(problems))


def _restore_checked(path: str, step: int, mesh: jax.sharding.Mesh, latent_shape) -> sampling.SamplerState:
  import orbax.checkpoint as ocp

  try:
    with open(os.path.join(path, STATE_CHECKSUMS), encoding="utf-8") as f:
      sums = json.load(f)["arrays"]
  except FileNotFoundError:
    raise ValueError(f"no {STATE_CHECKSUMS} (the save did not complete)") from None
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
    raise ValueError(f"{STATE_CHECKSUMS} cannot be read (truncated or damaged?): {video_io.one_line(err)}") from None
  frames = jax.sharding.NamedSharding(mesh, parallel.frames_spec())
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = {
    "x": jax.ShapeDtypeStruct(latent_shape, jnp.float32, sharding=frames),
    "x0": jax.ShapeDtypeStruct(latent_shape, jnp.float32, sharding=frames),
    "i": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
  }
  try:
    d = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
  except Exception as err:  # orbax / tensorstore raise many kinds for damaged files
    reason = video_io.one_line(err).split(". See full TensorStore details")[0]  # not its whole spec
    raise ValueError(f"the checkpoint cannot be read (truncated or damaged?): {reason}") from None
  got = _checksums(d)
  bad = [k for k in target if not isinstance(sums.get(k), dict) or sums[k].get("sha256") != got[k]["sha256"]]
  if bad:
    raise ValueError(f"the checksum of {', '.join(repr(k) for k in bad)} does not match: the files are damaged")
  if int(np.asarray(d["i"])) != step:
    raise ValueError(f"it holds step {int(np.asarray(d['i']))}")
  return sampling.SamplerState(x=d["x"], x0=d["x0"], i=d["i"])


# ------------------------------------------------------------------------------------------------
# The run


def _clock(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.isfinite(x).all()


def _latent_shape(cfg: GenerationConfig, mcfg: ModelConfig) -> tuple[int, ...]:
  f = mcfg.vae.downsample_factor
  return (1, cfg.frames, cfg.height // f, cfg.width // f, mcfg.unet.in_channels)


def _step_key(cfg: GenerationConfig, mesh: jax.sharding.Mesh, latent_shape, per_frame: bool) -> tuple:
  """What the compiled guided step depends on (``generate`` keeps one step program per key)."""
  return (
    cfg.sampler_config(),
    cfg.temporal_config(),
    tuple(mesh.devices.flat),
    latent_shape,
    per_frame,
    cfg.frame_chunk,
  )


def _decode_key(mesh: jax.sharding.Mesh, latent_shape, chunk: int) -> tuple:
  return (tuple(mesh.devices.flat), latent_shape, chunk)


def will_compile(cfg: GenerationConfig, models: Models) -> tuple[str, ...]:
  """The programs ``generate(cfg, models=models)`` would compile now: ``'step'`` and/or ``'decode'``.

  Empty when the programs kept on ``models`` from the last video fit these settings (same shapes, sampler,
  temporal options and devices; prompts, seed and the outputs do not matter). ``cfg`` must be valid.
  """
  mesh = parallel.make_mesh(cfg.num_devices or None)
  shape = _latent_shape(cfg, models.config)
  step = models.compiled.get("step_key") != _step_key(cfg, mesh, shape, len(cfg.prompts) > 1)
  step = step or models.compiled.get("step", (None, None))[1] is None
  decode = models.compiled.get("decode_key") != _decode_key(mesh, shape, cfg.decode_chunk)
  return (("step",) if step else ()) + (("decode",) if decode else ())


def use_compilation_cache(path: str) -> None:
  """Compile into (and load from) JAX's persistent cache at `path` from now on.

  JAX opens its cache once per process, at the first compile; a later change of the folder alone would be
  ignored (a notebook or the web app that compiled before, or another folder set earlier), so the cache is
  reopened when the folder changes.
  """
  from jax.experimental.compilation_cache import compilation_cache

  path = os.path.abspath(path)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _one_run_per_output(fn):
  """Hold a lock on the run's outputs (video, latents, state directory) while ``fn(cfg, ...)`` runs, so a
  second run writing the same paths is refused at once (:class:`vinf_jax.video_io.BusyError`) instead of
  overwriting the first one's files. Process 0 writes, so it holds the locks."""

  @functools.wraps(fn)
  def locked(cfg: GenerationConfig, *args, **kwargs):
    if jax.process_index() != 0:
      return fn(cfg, *args, **kwargs)
    paths = {"output": cfg.output, "save_latents": cfg.save_latents, "state_dir": cfg.state_dir or cfg.resume}
    with video_io.lock_paths(paths):
      return fn(cfg, *args, **kwargs)

  return locked


@_one_run_per_output
def generate(
  cfg: GenerationConfig,
  *,
  models: Models | None = None,
  log: Callable[[str], None] = _log0,
  on_step: Callable[[StepInfo], None] | None = None,
  should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
  """Make the video of ``cfg``; see the module docstring. Raises ValueError for bad settings before any work.

  Args:
    cfg: the settings.
    models: models from :func:`load_models` for these settings, to reuse them across videos (a notebook,
      tests); loaded here when None.
    log: where progress lines go (default: printed on process 0).
    on_step: called with a :class:`StepInfo` after each sampling step (a progress bar).
    should_stop: asked before each sampling step and before decoding; True raises :class:`Cancelled` there,
      with nothing written. With several processes it must give the same answer on every process (a process
      that stopped alone would leave the others waiting in the step's collectives).
  """
  t_start = time.perf_counter()
  plan = validate(cfg)
  if cfg.compilation_cache_dir:
    use_compilation_cache(cfg.compilation_cache_dir)
  timings: dict[str, float] = {}
  mesh = parallel.make_mesh(cfg.num_devices or None)
  d = mesh.shape[parallel.FRAMES]
  # a damaged state is found before the models load; the older state is the fallback
  resumed = _restore_state(cfg.resume, mesh, _latent_shape(cfg, plan.model), log) if cfg.resume else None
  log(
    f"{cfg.frames} frames at {cfg.height}x{cfg.width} over {d} device(s) "
    f"({jax.process_count()} process(es), {jax.devices()[0].device_kind}), dtype {plan.dtype}, "
    f"{cfg.sampler} {cfg.steps} steps, guidance {cfg.resolved_guidance():g}, {cfg.attention} attention"
  )

  t = time.perf_counter()
  if models is None:
    models = load_models(cfg, plan, log, mesh=mesh)
  elif models.config.with_dtype("float32") != plan.model.with_dtype("float32"):
    raise ValueError(f"the models passed are of {models.config.name!r}, the settings ask for {plan.model.name!r}")
  mcfg = models.config
  timings["load"] = time.perf_counter() - t

  t = time.perf_counter()
  prompts = list(cfg.prompts)
  emb = encode_prompts(models.text_encoder, models.tokenize, prompts + [cfg.negative_prompt])
  emb_c, emb_u = emb[:-1], emb[-1:]  # [P, 77, C], [1, 77, C]
  per_frame = len(prompts) > 1
  if per_frame:
    w = prompt_weights(len(prompts), cfg.frames, cfg.prompt_transition)
    ctx_c = frame_contexts(emb_c, w, mesh)
    ctx_u = frame_contexts(emb_u, np.ones((cfg.frames, 1), np.float32), mesh)
  else:
    ctx_c, ctx_u = parallel.replicate(emb_c, mesh), parallel.replicate(emb_u, mesh)
  timings["encode"] = time.perf_counter() - t

  latent_shape = _latent_shape(cfg, mcfg)
  splan = sampling.make_plan(cfg.sampler_config())
  # Programs are kept on the models for the next video with the same shapes and settings (a notebook
  # trying prompts and seeds, tests): one entry, so old programs and weight copies do not pile up.
  key = _step_key(cfg, mesh, latent_shape, per_frame)
  if models.compiled.get("step_key") != key:
    models.compiled.pop("step", None)
    kw = {"frame_chunk": cfg.frame_chunk} if cfg.frame_chunk else {}
    den = parallel.make_denoiser(
      models.unet,
      splan,
      cfg.temporal_config(),
      mesh,
      latent_shape=latent_shape,
      context_per_frame=per_frame,
      **kw,
    )
    models.compiled.update(step_key=key, step=(den, None))
  den, step = models.compiled["step"]
  fps = parallel.replicate(np.array([cfg.fps], np.int32), mesh)
  seed = parallel.replicate(np.int32(cfg.seed), mesh)
  num_steps = den.num_steps

  if resumed is not None:
    state = resumed
    log(f"resumed from {cfg.resume} at step {int(np.asarray(state.i))}/{num_steps}")
  else:
    state = den.init(seed)
  start = int(np.asarray(state.i))
  state_dir = cfg.state_dir or cfg.resume

  t = time.perf_counter()
  if step is None:
    step = den.step.lower(den.params, state, ctx_c, ctx_u, fps, seed).compile(parallel.compiler_options(d))
    models.compiled["step"] = (den, step)
  timings["compile"] = time.perf_counter() - t
  log(
    f"compiled the {'guided' if splan.guided else 'turbo'} step in {timings['compile']:.1f} s "
    f"(load {timings['load']:.1f} s, text {timings['encode']:.1f} s)"
  )

  sidecar = {
    "prompts": prompts,
    "negative_prompt": cfg.negative_prompt,
    "seed": cfg.seed,
    "settings": dataclasses.asdict(cfg)
    | {"dtype": plan.dtype, "model": mcfg.name, "num_devices": d, "guidance": cfg.resolved_guidance()}
    | {k: getattr(cfg.temporal_config(), k) for k in ("global_phase_from", "local_phase_below")},
    "model": json.loads(mcfg.to_json()),
    "devices": {
      "count": d,
      "processes": jax.process_count(),
      "platform": jax.default_backend(),
      "kind": jax.devices()[0].device_kind,
    },
    "versions": _versions(),
    "timings_s": timings,
  }

  if cfg.compile_only:
    t = time.perf_counter()
    _decoder(models, mesh, latent_shape, cfg.decode_chunk, state.x)
    timings["decode_compile"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    log(f"compiled the decoder in {timings['decode_compile']:.1f} s; compile_only: stopping before the first step")
    return GenerationResult(None, None, None, sidecar, start, num_steps)

  end = num_steps if not cfg.stop_after else min(num_steps, start + cfg.stop_after)
  t0 = time.perf_counter()
  for i in range(start, end):
    if should_stop is not None and should_stop():
      raise Cancelled(f"cancelled before step {i + 1}/{num_steps}; nothing was written")
    ts = int(splan.timesteps[i])
    state = step(den.params, state, ctx_c, ctx_u, fps, seed)
    if not bool(_all_finite(state.x)):  # waits for the step; a NaN would only spread from here
      raise FloatingPointError(
        f"the latents hold NaN or inf after step {i + 1}/{num_steps} (timestep {ts}); nothing was written. "
        + _nan_advice(cfg, plan)
      )
    done, el = i + 1 - start, time.perf_counter() - t0
    rate = el / done
    log(
      f"step {i + 1:3d}/{num_steps}  t={ts:4d}  {rate:6.2f} s/step  "
      f"{cfg.frames / rate:7.1f} frames/s  elapsed {_clock(el)}  ETA {_clock(rate * (end - i - 1))}"
    )
    if on_step is not None:
      on_step(StepInfo(i + 1, num_steps, ts, rate, el, rate * (end - i - 1)))
    if state_dir and cfg.save_state_every and (i + 1) % cfg.save_state_every == 0 and i + 1 < num_steps:
      try:
        _save_state(state_dir, state, cfg)
      except video_io.WriteError as err:  # the run goes on; the previous state stays
        log(f"warning: {err}; sampling goes on")
  timings["denoise"] = time.perf_counter() - t0

  if end < num_steps:
    path = _save_state(state_dir, state, cfg)
    log(f"stopped after step {end}/{num_steps}; state saved in {path}; continue with resume={state_dir!r}")
    return GenerationResult(None, None, None, sidecar, end, num_steps)

  if should_stop is not None and should_stop():
    raise Cancelled(f"cancelled after step {end}/{num_steps}, before decoding; nothing was written")
  t = time.perf_counter()
  vae_params, decode_c = _decoder(models, mesh, latent_shape, cfg.decode_chunk, state.x)
  timings["decode_compile"] = time.perf_counter() - t
  t = time.perf_counter()
  video = decode_c(vae_params, state.x)
  frames = parallel.gather_to_host(video)[0]  # [N, H, W, 3] uint8
  latents = parallel.gather_to_host(state.x)
  timings["decode"] = time.perf_counter() - t
  log(f"decoded {cfg.frames} frames in {timings['decode']:.1f} s (compile {timings['decode_compile']:.1f} s)")

  out = _write_outputs(cfg, frames, latents, sidecar, timings, t_start, state)
  log(
    f"wrote {out or '(no output file)'}: {cfg.frames} frames; denoise {timings['denoise']:.1f} s "
    f"({timings['denoise'] / max(1, end - start):.2f} s/step), compile {timings['compile']:.1f} s, "
    f"total {timings['total']:.1f} s"
  )
  return GenerationResult(frames, latents, out, sidecar, end, num_steps)


def _latent_shape(cfg: GenerationConfig, model: ModelConfig) -> tuple[int, int, int, int, int]:
  f = model.vae.downsample_factor
  return (1, cfg.frames, cfg.height // f, cfg.width // f, model.unet.in_channels)


def _nan_advice(cfg: GenerationConfig, plan: _Plan) -> str:
  """What to try after NaN latents, for these settings."""
  if plan.dtype == "float16":
    return "float16 overflows easily: try dtype=bfloat16 (same memory, float32's range) or dtype=float32."
  if plan.dtype == "bfloat16":
    return "Try dtype=float32 to see whether it is a precision problem."
  hint = f"guidance={cfg.guidance:g} is high; try a lower guidance. " if cfg.guidance > 30 else ""
  source = f"the weights in {cfg.weights!r} (converted from a damaged checkpoint?)" if cfg.weights else "the settings"
  return f"The run is already float32, so it is not a precision problem: {hint}check {source}."


def _from_process0(value: int) -> int:
  """Process 0's ``value`` (an int32) on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _write_outputs(
  cfg: GenerationConfig,
  frames: np.ndarray,
  latents: np.ndarray,
  sidecar: dict,
  timings: dict,
  t_start: float,
  state: sampling.SamplerState,
) -> str | None:
  """Process 0 writes the latents, the video and its sidecar, renamed into place together (or none).

  When a write fails, files already at those paths keep what they held, the partial files are removed and
  the final state is saved (:func:`_rescue`) so that nothing sampled is lost; then WriteError is raised
  (on every process) saying where the state went and how to write the video from it.
  """
  t = time.perf_counter()
  out, failed = None, None
  sidecar["output"] = {
    "path": os.path.abspath(cfg.output.rstrip("/")) if cfg.output else None,
    "frames": int(frames.shape[0]),
    "height": int(frames.shape[1]),
    "width": int(frames.shape[2]),
    "export_fps": cfg.export_fps,
    "latents": os.path.abspath(cfg.save_latents) if cfg.save_latents else None,
    "latents_layout": "float32 [1, frames, height/8, width/8, 4], scale_factor * z (as the UNet sees them)",
  }
  if jax.process_index() == 0:
    try:
      with video_io.AtomicFiles() as files:
        if cfg.save_latents:
          video_io.write_npy(cfg.save_latents, latents, files=files)
        if cfg.output:
          out = video_io.write_video(cfg.output, frames, cfg.export_fps, files=files)
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        if cfg.output:
          video_io.write_json(video_io.sidecar_path(cfg.output), sidecar, files=files)
    except video_io.WriteError as err:
      failed = err
  if not _from_process0(failed is not None):
    timings.setdefault("write", time.perf_counter() - t)
    timings.setdefault("total", time.perf_counter() - t_start)
    return out
  what = failed or "process 0 could not write the outputs"
  raise video_io.WriteError(f"{what}; the files already there are unchanged; {_rescue(cfg, state, latents)}")


def _rescue(cfg: GenerationConfig, state: sampling.SamplerState, latents: np.ndarray) -> str:
  """Save what a run computed when its outputs could not be written; returns where, as advice.

  The final sampler state goes to ``state_dir`` (or ``resume``) when given, else to a new directory under
  the system's temporary directory, as a state that ``resume`` turns into the video without sampling again.
  Several processes without a ``state_dir`` (each host its own temporary directory) get the latents as a
  ``.npy`` on process 0 instead.
  """
  import tempfile

  stem = os.path.splitext(os.path.basename((cfg.output or cfg.save_latents or "video").rstrip("/")))[0]
  token = _from_process0(int.from_bytes(os.urandom(3), "little"))  # < 2**24: an int32 when broadcast
  temp = os.path.join(tempfile.gettempdir(), f"vinf_jax-rescue-{stem}-{token:06x}")
  state_dir = cfg.state_dir or cfg.resume
  if state_dir or jax.process_count() == 1:
    failures = []
    for where in [state_dir] * bool(state_dir) + [temp] * (jax.process_count() == 1):
      try:
        _save_state(where, state, cfg)
      except video_io.WriteError as err:
        failures.append(str(err))
        continue
      return (
        f"the sampled latents are saved as a state in {where}: run the same command with --resume={where} and "
        "an --output where there is room (it only decodes and writes)"
      )
    return f"saving the sampled state failed too ({'; '.join(failures)})"
  if jax.process_index() != 0:
    return "process 0 saved the latents"
  path = temp + ".npy"
  try:
    video_io.write_npy(path, latents)
  except video_io.WriteError as err:
    return f"saving the latents failed too ({err})"
  return f"the final latents (float32 [1, frames, h/8, w/8, 4], scale_factor * z) are saved in {path} on process 0"


def _versions() -> dict[str, str]:
  import flax

  from vinf_jax import __version__

  return {
    "vinf_jax": __version__,
    "jax": jax.__version__,
    "jaxlib": getattr(jax.lib, "__version__", "") or _pkg_version("jaxlib"),
    "flax": flax.__version__,
    "numpy": np.__version__,
    "python": sys.version.split()[0],
  }


def _pkg_version(name: str) -> str:
  from importlib import metadata

  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return ""
