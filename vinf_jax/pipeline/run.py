"""One video from its settings: :func:`generate` as a sequence of named stages, each callable on its own.

``prepare`` (validate, devices, a resumed state) -> ``load`` -> ``encode`` -> ``compile_step`` -> ``sample``
-> ``decode`` -> ``write``. The stages pass a :class:`Run` along (the settings, what validation resolved,
the mesh, the timings) and add to it; the app, the benchmarks and the notebook call the same stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vinf_jax import parallel, sampling, video_io
from vinf_jax.pipeline import decoded as decoded_lib
from vinf_jax.pipeline import interrupts, outputs, programs, prompts
from vinf_jax.pipeline import memory as memory_lib
from vinf_jax.pipeline import models as models_lib
from vinf_jax.pipeline import state as state_lib
from vinf_jax.pipeline.progress import StepInfo, log0, step_line
from vinf_jax.pipeline.settings import GenerationConfig, Resolved, latent_shape, validate


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


class OutOfMemory(RuntimeError):
  """A stage ran out of device memory (the memory plan was short); its one-line message names the stage,
  what the plan expected and what to lower, and where the sampled state went when there was one."""


def is_out_of_memory(err: BaseException) -> bool:
  """XLA's out-of-memory errors (compile, autotuning, a step, the decode): RESOURCE_EXHAUSTED."""
  msg = str(err)
  return isinstance(err, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg)


@contextlib.contextmanager
def out_of_memory(run: Run, stage: str, state: Callable[[], sampling.SamplerState] | None = None):
  """Turn an out-of-memory error inside the block into :class:`OutOfMemory`; with ``state`` (the newest
  sampler state, when the error comes) save it as a resumable state first, as after a failed write. A step
  donates its input state: when the step itself fails, that state may be gone with it (then the message says
  so; ``save_state_every`` keeps earlier ones)."""
  try:
    yield
  except jax.errors.JaxRuntimeError as err:
    if not is_out_of_memory(err):
      raise
    mem, g = run.plan.memory, lambda b: f"{b / memory_lib.GiB:.2f} GiB"
    where = f" of the {g(mem.limit)} a device offers ({mem.limit_source})" if mem.limit else ""
    saved = ""
    if state is not None:
      try:
        saved = "; " + outputs.rescue(run.cfg, state(), None)
      except Exception as save_err:  # noqa: BLE001 -- a donated state may be gone with the failed step
        saved = f"; the sampled state could not be saved ({video_io.one_line(save_err)})"
    raise OutOfMemory(
      f"out of device memory while {stage}: the memory plan expected a peak of {g(mem.peak)} per device{where} "
      f"(frame_chunk {mem.frame_chunk}, decode_chunk {mem.decode_chunk}); lower --frame_chunk / --decode_chunk, "
      f"spread the frames over more devices, or pass --device_memory_gib below what the device has so the plan "
      f"leaves more room{saved}"
    ) from None


@contextlib.contextmanager
def stopping(run: Run, when: str, state: Callable[[], sampling.SamplerState] | None = None, *, at_once: bool = True):
  """A signal's :class:`.interrupts.Stop` inside the block (at once where ``at_once``, else from an inner
  :func:`.interrupts.at_once`) -> :class:`.interrupts.Interrupted`, with ``state()`` saved first when given."""
  try:
    with interrupts.at_once() if at_once else contextlib.nullcontext():
      yield
  except interrupts.Stop as stop:
    raise interrupted(run, stop.signum, when, state() if state is not None else None) from None


def interrupted(run: Run, signum: int, when: str, state: sampling.SamplerState | None) -> interrupts.Interrupted:
  """The :class:`.interrupts.Interrupted` of a signal that came ``when``: with a sampler state, that state is
  saved first where ``resume`` finds it (:func:`.outputs.save_resumable`); the exception's ``state_dir`` is
  what ``resume`` continues from."""
  cfg, sig = run.cfg, interrupts.name(signum)
  if state is None and cfg.resume:
    return interrupts.Interrupted(f"stopped by {sig} {when}; {cfg.resume} keeps its state", signum, cfg.resume)
  if state is None:
    return interrupts.Interrupted(f"stopped by {sig} {when}, before sampling: nothing to save", signum)
  where, why = outputs.save_resumable(cfg, state)
  if where is None:
    return interrupts.Interrupted(f"stopped by {sig} {when}; the state could not be saved: {why}", signum)
  step = int(np.asarray(state.i))
  return interrupts.Interrupted(f"stopped by {sig} {when}; the state of step {step} is saved in {where}", signum, where)


@dataclasses.dataclass
class Run:
  """One video's run as its stages pass it on.

  Attributes:
    cfg: the settings; plan: what :func:`validate` resolved for them; mesh: the devices' mesh.
    log: where progress lines go; timings: seconds per stage (the sidecar's ``timings_s``).
    t_start: when the run began (``time.perf_counter``).
    resumed: the state restored from ``cfg.resume``, or None.
    models: the models (after ``load``).
  """

  cfg: GenerationConfig
  plan: Resolved
  mesh: jax.sharding.Mesh
  log: Callable[[str], None] = log0
  timings: dict = dataclasses.field(default_factory=dict)
  t_start: float = dataclasses.field(default_factory=time.perf_counter)
  resumed: sampling.SamplerState | None = None
  models: models_lib.Models | None = None

  @property
  def num_devices(self) -> int:
    return self.mesh.shape[parallel.FRAMES]

  @property
  def latent_shape(self) -> tuple[int, int, int, int, int]:
    return latent_shape(self.cfg, self.models.config if self.models is not None else self.plan.model)


@dataclasses.dataclass
class Text:
  """The text each frame sees: conditional and unconditional contexts on the mesh (``encode``)."""

  ctx_c: jax.Array
  ctx_u: jax.Array
  per_frame: bool
  truncated: list = dataclasses.field(default_factory=list)  # prompts.truncated(): the sidecar's prompts_truncated


@dataclasses.dataclass
class Sampler:
  """The compiled step and what it runs on (``compile_step``): the denoiser, its program, the sampler's plan,
  the fps and seed on the mesh, and the state sampling starts from (step ``start``)."""

  den: object
  step: Callable
  splan: sampling.SamplerPlan
  fps: jax.Array
  seed: jax.Array
  state: sampling.SamplerState
  start: int

  @property
  def num_steps(self) -> int:
    return self.den.num_steps


@outputs.one_run_per_output
def generate(
  cfg: GenerationConfig,
  *,
  models: models_lib.Models | None = None,
  log: Callable[[str], None] = log0,
  on_step: Callable[[StepInfo], None] | None = None,
  should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
  """Make the video of ``cfg``; see the package docstring. Raises ValueError for bad settings before any work.

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
  run = prepare(cfg, log)
  with stopping(run, "while loading the models"):
    load(run, models)
    text = encode(run)
  with stopping(run, "while compiling the step"):
    smp = compile_step(run, text)
  sidecar = outputs.make_sidecar(cfg, run.plan, run.models.config, run.num_devices, run.timings)
  if text.truncated:
    sidecar["prompts_truncated"] = text.truncated
  if cfg.compile_only:
    t = time.perf_counter()
    with out_of_memory(run, "compiling the decoder"), stopping(run, "while compiling the decoder"):
      programs.decoder(run.models, run.mesh, run.latent_shape, run.plan.decode_chunk, smp.state.x)
    run.timings["decode_compile"] = time.perf_counter() - t
    run.timings["total"] = time.perf_counter() - run.t_start
    log(f"compiled the decoder in {run.timings['decode_compile']:.1f} s; compile_only: stopping before the first step")
    return GenerationResult(None, None, None, sidecar, smp.start, smp.num_steps)

  state, end = sample(run, text, smp, on_step, should_stop)
  if end < smp.num_steps:
    state_dir = cfg.state_dir or cfg.resume
    path = state_lib.save_state(state_dir, state, cfg)
    log(f"stopped after step {end}/{smp.num_steps}; state saved in {path}; continue with resume={state_dir!r}")
    return GenerationResult(None, None, None, sidecar, end, smp.num_steps)
  if should_stop is not None and should_stop():
    raise Cancelled(f"cancelled after step {end}/{smp.num_steps}, before decoding; nothing was written")
  if signum := interrupts.requested():
    raise interrupted(run, signum, "before decoding", state)
  with stopping(run, "while decoding", lambda: state):
    video, latents = decode(run, state)
  if signum := interrupts.requested():
    raise interrupted(run, signum, "before writing", state)
  when = "while decoding and writing" if streams(cfg) else "while writing"
  with stopping(run, f"{when} (nothing was written)", lambda: state, at_once=False):
    out = write(run, video, latents, sidecar, state, end - smp.start)
  clean_states(run)
  return GenerationResult(video.all(), latents, out, sidecar, end, smp.num_steps)


def clean_states(run: Run) -> None:
  """After the outputs were written: the saved states that led to them (``state_dir``, ``resume``) are stale;
  remove them (:func:`.state.remove_states`). A run that writes no file keeps them (they are all it made)."""
  cfg = run.cfg
  if not (cfg.output or cfg.save_latents):
    return
  for d in dict.fromkeys(d for d in (cfg.state_dir, cfg.resume) if d):
    if os.path.isdir(d) and state_lib.remove_states(d):
      run.log(f"removed the saved states in {d} (the video they lead to is written)")


def prepare(cfg: GenerationConfig, log: Callable[[str], None] = log0) -> Run:
  """Validate the settings, open the compilation cache, make the mesh, restore a resumed state (a damaged
  state is found before the models load; the older state is the fallback) and say what will run."""
  t_start = time.perf_counter()
  plan = validate(cfg)
  if cfg.compilation_cache_dir:
    programs.use_compilation_cache(cfg.compilation_cache_dir)
  run = Run(cfg, plan, parallel.make_mesh(cfg.num_devices or None), log, t_start=t_start)
  if cfg.resume:
    run.resumed = state_lib.restore_state(cfg.resume, run.mesh, run.latent_shape, log, state_lib.fingerprint(cfg))
  log(
    f"{cfg.frames} frames at {cfg.height}x{cfg.width} over {run.num_devices} device(s) "
    f"({jax.process_count()} process(es), {jax.devices()[0].device_kind}), dtype {plan.dtype}, "
    f"{cfg.sampler} {cfg.steps} steps, guidance {cfg.resolved_guidance():g}, {cfg.attention} attention"
  )
  log(plan.memory.describe())
  return run


def load(run: Run, models: models_lib.Models | None = None) -> models_lib.Models:
  """The run's models: ``models`` when given (they must be of the settings' model), else loaded."""
  t = time.perf_counter()
  if models is None:
    models = models_lib.load_models(run.cfg, run.plan, run.log, mesh=run.mesh)
  elif models.config.with_dtype("float32") != run.plan.model.with_dtype("float32"):
    raise ValueError(f"the models passed are of {models.config.name!r}, the settings ask for {run.plan.model.name!r}")
  run.models = models
  run.timings["load"] = time.perf_counter() - t
  return models


def encode(run: Run) -> Text:
  """Encode the prompts and the negative prompt once; lay out each frame's text (one prompt: replicated)."""
  t = time.perf_counter()
  cfg, mesh, m = run.cfg, run.mesh, run.models
  cut = prompts.truncated(m.tokenize, list(cfg.prompts), cfg.negative_prompt)
  if cut:
    run.log(prompts.truncation_warning(cut, len(cfg.prompts)))
  emb = prompts.encode_prompts(m.text_encoder, m.tokenize, list(cfg.prompts) + [cfg.negative_prompt], run.timings)
  emb_c, emb_u = emb[:-1], emb[-1:]  # [P, 77, C], [1, 77, C]
  per_frame = len(cfg.prompts) > 1
  if per_frame:
    w = prompts.prompt_weights(len(cfg.prompts), cfg.frames, cfg.prompt_transition)
    ctx_c = prompts.frame_contexts(emb_c, w, mesh)
    ctx_u = prompts.frame_contexts(emb_u, np.ones((cfg.frames, 1), np.float32), mesh)
  else:
    ctx_c, ctx_u = parallel.replicate(emb_c, mesh), parallel.replicate(emb_u, mesh)
  run.timings["encode"] = time.perf_counter() - t - run.timings["text_compile"]  # compile is counted apart
  return Text(ctx_c, ctx_u, per_frame, cut)


def compile_step(run: Run, text: Text) -> Sampler:
  """The guided (or turbo) step for these settings, compiled unless the models keep it from the last video,
  and the state to start from (x_T of the seed, or the resumed state)."""
  cfg, mesh, shape = run.cfg, run.mesh, run.latent_shape
  splan = sampling.make_plan(cfg.sampler_config())

  def make():
    kw = {"frame_chunk": run.plan.frame_chunk} if run.plan.frame_chunk else {}
    temporal = cfg.temporal_config()
    return parallel.make_denoiser(
      run.models.unet, splan, temporal, mesh, latent_shape=shape, context_per_frame=text.per_frame, **kw
    )

  kept = run.models.programs
  den = kept.denoiser_for(programs.step_key(cfg, mesh, shape, text.per_frame, run.plan.frame_chunk), make)
  fps = parallel.replicate(np.array([cfg.fps], np.int32), mesh)
  seed = parallel.replicate(np.int32(cfg.seed), mesh)
  if run.resumed is not None:
    state = run.resumed
    run.log(f"resumed from {cfg.resume} at step {int(np.asarray(state.i))}/{den.num_steps}")
  else:
    state = den.init(seed)
  t = time.perf_counter()
  if kept.step is None:
    args = (den.params, state, text.ctx_c, text.ctx_u, fps, seed)
    with out_of_memory(run, "compiling the step"):
      kept.step = den.step.lower(*args).compile(parallel.compiler_options(run.num_devices))
  run.timings["compile"] = time.perf_counter() - t
  tm = run.timings
  run.log(
    f"compiled the {'guided' if splan.guided else 'turbo'} step in {tm['compile']:.1f} s "
    f"(load {tm['load']:.1f} s, text {tm['encode']:.1f} s, its compile {tm['text_compile']:.1f} s)"
  )
  return Sampler(den, kept.step, splan, fps, seed, state, int(np.asarray(state.i)))


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.isfinite(x).all()


def sample(
  run: Run,
  text: Text,
  smp: Sampler,
  on_step: Callable[[StepInfo], None] | None = None,
  should_stop: Callable[[], bool] | None = None,
) -> tuple[sampling.SamplerState, int]:
  """Run the sampling steps of this invocation (to the end, or ``stop_after`` of them); returns the state and
  the steps done. Saves state every ``save_state_every`` steps; NaN latents stop the run at once."""
  cfg, n = run.cfg, smp.num_steps
  state, start = smp.state, smp.start
  state_dir = cfg.state_dir or cfg.resume
  end = n if not cfg.stop_after else min(n, start + cfg.stop_after)
  t0 = time.perf_counter()
  for i in range(start, end):
    if should_stop is not None and should_stop():
      raise Cancelled(f"cancelled before step {i + 1}/{n}; nothing was written")
    if signum := interrupts.requested():  # the state of step i is whole (step 0: nothing sampled yet)
      raise interrupted(run, signum, f"after step {i}/{n}", state if i > 0 else None)
    ts = int(smp.splan.timesteps[i])
    with out_of_memory(run, f"sampling step {i + 1}/{n}", lambda: state):  # noqa: B023 -- the newest, on purpose
      state = smp.step(smp.den.params, state, text.ctx_c, text.ctx_u, smp.fps, smp.seed)
      finite = bool(_all_finite(state.x))  # waits for the step; a NaN would only spread from here
    if not finite:
      raise FloatingPointError(
        f"the latents hold NaN or inf after step {i + 1}/{n} (timestep {ts}); nothing was written. "
        + nan_advice(cfg, run.plan)
      )
    el = time.perf_counter() - t0
    rate = el / (i + 1 - start)
    info = StepInfo(i + 1, n, ts, rate, el, rate * (end - i - 1))
    run.log(step_line(info, cfg.frames))
    if on_step is not None:
      on_step(info)
    if state_dir and cfg.save_state_every and (i + 1) % cfg.save_state_every == 0 and i + 1 < n:
      try:
        state_lib.save_state(state_dir, state, cfg)
      except video_io.WriteError as err:  # the run goes on; the previous state stays
        run.log(f"warning: {err}; sampling goes on")
  run.timings["denoise"] = time.perf_counter() - t0
  return state, end


def decode(run: Run, state: sampling.SamplerState) -> tuple[decoded_lib.Decoded, np.ndarray]:
  """The VAE decode of the final latents on each device (compiled once per shape and chunk), started: the
  frames come to the host piece by piece as the writer takes them (:class:`.decoded.Decoded`; a run that
  writes no mp4, or runs several processes, gathers them all here); and the float32 latents."""
  cfg = run.cfg
  t = time.perf_counter()
  with out_of_memory(run, "compiling the decoder", lambda: state):
    vae_params, decode_c, piece = programs.decoder(
      run.models, run.mesh, run.latent_shape, run.plan.decode_chunk, state.x
    )
  run.timings["decode_compile"] = time.perf_counter() - t
  with out_of_memory(run, "decoding", lambda: state):
    video = decoded_lib.Decoded(decode_c, vae_params, state.x, piece, run.mesh, (cfg.height, cfg.width, 3))
    latents = parallel.gather_to_host(state.x)
    if not streams(cfg):
      video.all()
      run.timings["decode"] = video.done_at - video.started
      run.log(
        f"decoded {cfg.frames} frames in {run.timings['decode']:.1f} s (compile {run.timings['decode_compile']:.1f} s)"
      )
  return video, latents


def streams(cfg: GenerationConfig) -> bool:
  """Whether the decode hands its pieces to the writer as they come (an mp4 written by one process)."""
  return bool(cfg.output) and video_io.output_kind(cfg.output) == "mp4" and jax.process_count() == 1


def write(
  run: Run, video: decoded_lib.Decoded, latents: np.ndarray, sidecar: dict, state: sampling.SamplerState, steps: int
) -> str | None:
  """Write the outputs (:func:`.outputs.write_outputs`; an mp4 encodes while the rest decodes) and the run's
  closing line; ``steps``: this invocation's sampling steps (for the seconds per step)."""
  cfg, tm = run.cfg, run.timings
  with out_of_memory(run, "decoding", lambda: state):
    out = outputs.write_outputs(cfg, video, latents, sidecar, tm, run.t_start, state)
  if streams(cfg):
    run.log(
      f"decoded {cfg.frames} frames in {tm['decode']:.1f} s while writing them (compile {tm['decode_compile']:.1f} s), "
      f"then {tm['write']:.1f} s to finish the file"
    )
  run.log(
    f"wrote {out or '(no output file)'}: {cfg.frames} frames; denoise {tm['denoise']:.1f} s "
    f"({tm['denoise'] / max(1, steps):.2f} s/step), compile {tm['compile']:.1f} s, "
    f"total {tm['total']:.1f} s"
  )
  return out


def nan_advice(cfg: GenerationConfig, plan: Resolved) -> str:
  """What to try after NaN latents, for these settings."""
  if plan.dtype == "float16":
    return "float16 overflows easily: try dtype=bfloat16 (same memory, float32's range) or dtype=float32."
  if plan.dtype == "bfloat16":
    return "Try dtype=float32 to see whether it is a precision problem."
  hint = f"guidance={cfg.guidance:g} is high; try a lower guidance. " if cfg.guidance > 30 else ""
  source = f"the weights in {cfg.weights!r} (converted from a damaged checkpoint?)" if cfg.weights else "the settings"
  return f"The run is already float32, so it is not a precision problem: {hint}check {source}."
