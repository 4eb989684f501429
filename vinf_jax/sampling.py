"""Samplers as pure functions: VideoCrafter2's DDIM and DPM-Solver++(2M) SDE (Video-Infinity's sampler).

Everything that depends only on the step index is computed once on the host, in float64, into a
:class:`SamplerPlan` of per-step numpy arrays. A sampling step is then one affine update that only
indexes those arrays with the (traced) step index, so it lives happily inside ``jit``, ``scan`` and
``shard_map``::

  plan = make_plan(SamplerConfig(name="dpmpp_sde", steps=30, guidance=12.0))
  state = init(plan, initial_noise(seed, frames, (h, w, c))[None])           # x: [b, t, h, w, c]
  for i in range(num_steps(plan)):
    t = timestep(plan, i)                                                     # UNet timestep
    e_u, e_c = unet(state.x, t, uncond), unet(state.x, t, cond)
    state = step(plan, state, e_u, e_c, frame_noise(seed, i, frames, (h, w, c))[None])
  latent = state.x

Both samplers share one update (``i`` = sampling step, 0 = noisiest)::

  e  = e_u + g (e_c - e_u)
  x0 = x0_from_x[i] x - x0_from_eps[i] e
  x' = coef_x[i] x + coef_x0[i] x0 + coef_prev_x0[i] x0_prev + coef_eps[i] e + coef_noise[i] z

* DDIM (VideoCrafter2, ``lvdm/models/samplers/ddim.py`` with ``use_scale``): ``x0`` divides out
  ``scale_arr[t]`` and ``x' = sqrt(a_prev) s_prev x0 + sqrt(1 - a_prev - sigma^2) e + sigma z``, so
  ``coef_x = coef_prev_x0 = 0``.
* DPM-Solver++ SDE (Lu et al. 2022, arXiv 2211.01095, the stochastic data-prediction solver), in
  the variant diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
  solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")`` runs
  for Video-Infinity: with ``lambda = log(alpha / sigma)`` and ``h = lambda_next - lambda``::

    x' = (sigma_next / sigma) e^-h x + alpha_next (1 - e^-2h) D + sigma_next sqrt(1 - e^-2h) z
    D  = x0                                        (first order: the first and the last step)
    D  = x0 + (x0 - x0_prev) / (2 r),  r = h_prev / h   (second order, midpoint)

  The last step goes to sigma = 0 and returns the data prediction ``x0`` itself (no noise). No
  ``scale_arr``: the diffusers path of Video-Infinity does not apply it.

The latent layout is ``[b, t, h, w, c]``. Noise comes from :func:`initial_noise` and
:func:`frame_noise`, which derive every frame's noise from ``(seed, step, global frame index)`` so
that a video does not depend on how its frames are split over devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vinf_jax import schedule as schedule_lib

NUM_TRAIN_TIMESTEPS = 1000
LINEAR_START = 0.00085  # VideoCrafter2 `linear_start` (SD's "scaled_linear" beta_start)
LINEAR_END = 0.012
# VideoCrafter2's `use_scale`: scale_a, scale_b, base_scale_step; `fix_scale_bug: false` makes the
# constant part `num_timesteps` long, so the buffer has 400 + 1000 entries.
SCALE_A = 1.0
SCALE_B = 0.7
BASE_SCALE_STEP = 400

SAMPLERS = ("ddim", "dpmpp_sde", "turbo")
GUIDED = ("ddim", "dpmpp_sde")  # classifier-free guidance: two UNet branches per step
TURBO_ORIGINS = (50, 200)  # T2V-Turbo's training grid (v1) and the grid of v2 and the current demo
TURBO_GUIDANCE = 7.5  # T2V-Turbo's default embedded w
TURBO_STEPS, TURBO_FPS = 4, 16  # T2V-Turbo's (VC2) predict script: 4 steps on the 50-step grid, fps 16
TURBO_TIMESTEP_SCALING = 10.0  # the consistency boundary condition's time scale (LCM's timestep_scaling)
TURBO_SIGMA_DATA = 0.5

# Streams of the noise key tree: initial latent and per-step (SDE / DDIM eta) noise never collide.
_INITIAL_STREAM = 0
_STEP_STREAM = 1


# ----------------------------------------------------------------------------------------------
# Diffusion schedule (VideoCrafter2 `register_schedule` + `scale_arr`)


def schedule() -> dict[str, np.ndarray]:
  """The 13 top-level buffers of VideoCrafter2's LatentDiffusion, float32, computed as LDM does.

  Everything is computed in float64 and cast to float32 at the end (``register_schedule`` with
  ``v_posterior = 0``), then ``scale_arr`` (length 1400, see the module constants).
  """
  betas = np.linspace(LINEAR_START**0.5, LINEAR_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  scale_arr = np.concatenate([np.linspace(SCALE_A, SCALE_B, BASE_SCALE_STEP), np.full(NUM_TRAIN_TIMESTEPS, SCALE_B)])
  out = {
    "betas": betas,
    "alphas_cumprod": abar,
    "alphas_cumprod_prev": abar_prev,
    "sqrt_alphas_cumprod": np.sqrt(abar),
    "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
    "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
    "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
    "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
    "posterior_variance": posterior_variance,
    # The posterior variance is 0 at t = 0, hence the clip before the log.
    "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
    "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
    "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    "scale_arr": scale_arr,
  }
  return {k: v.astype(np.float32) for k, v in out.items()}


def check_schedule_buffers(buffers: Mapping[str, np.ndarray], atol: float = 1e-6, rtol: float = 1e-6) -> None:
  """Raises ValueError naming every buffer that is missing, unexpected, mis-shaped or off.

  A buffer is off when ``|got - want| > atol + rtol * |want|`` anywhere. The relative term allows
  for a float32 ulp of the large entries (``posterior_log_variance_clipped[0]`` is -46, where one
  ulp is 4e-6): the checkpoint's float64 betas came from ``torch.linspace``, not ``np.linspace``.
  """
  want = schedule()
  errors = []
  for name, ref in want.items():
    if name not in buffers:
      errors.append(f"{name}: missing")
      continue
    got = np.asarray(buffers[name])
    if got.shape != ref.shape:
      errors.append(f"{name}: shape {got.shape}, expected {ref.shape}")
      continue
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    bad = ~(diff <= atol + rtol * np.abs(ref.astype(np.float64)))  # NaN counts as bad
    if bad.any():
      worst = float("nan") if np.isnan(diff).any() else float(diff.max())
      errors.append(
        f"{name}: max |diff| {worst:.3g}, {int(bad.sum())} of {ref.size} entries beyond "
        f"atol={atol:g} + rtol={rtol:g} * |expected|"
      )
  for name in sorted(set(buffers) - set(want)):
    errors.append(f"{name}: unexpected buffer")
  if errors:
    raise ValueError("schedule buffers disagree with VideoCrafter2's schedule:\n  - " + "\n  - ".join(errors))


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Which sampler, how many steps, how much guidance.

  Attributes:
    name: 'dpmpp_sde' (Video-Infinity: diffusers' SDE-DPM-Solver++ 2M, midpoint, no Karras sigmas,
      'linspace' timesteps 999, 966, 932, ... for 30 steps; no ``scale_arr``) or 'ddim'
      (VideoCrafter2's own DDIM with ``scale_arr``; its script runs 50 steps, eta 1.0).
    steps: requested number of sampling steps (1..500 for 'ddim', 1..999 for 'dpmpp_sde', 1..turbo_origin
      for 'turbo'). DDIM may run more, see ``ddim_exact_steps``.
    guidance: classifier-free guidance scale g in ``e = e_u + g (e_c - e_u)`` (>= 0; both
      VideoCrafter2 and Video-Infinity use 12); for 'turbo' (T2V-Turbo's consistency sampler: one UNet
      call per step, no unconditional branch) the w embedded into the UNet (7.5).
    eta: DDIM noise level (0 = deterministic DDIM, 1 = VideoCrafter2's default). Ignored by 'dpmpp_sde'.
    turbo_origin: 'turbo' only: the grid the few-step timesteps come from (50: T2V-Turbo v1's training grid;
      200: v2's and the current demo's), see :func:`turbo_timesteps`.
    motion_scale: 'turbo' on a T2V-Turbo-v2 UNet (motion conditioning) only: the motion scale m (0.05).
    motion_cutoff: 'turbo' v2 only: m is 0 for timesteps t < 1000 * (1 - motion_cutoff) (0.5).
    ddim_exact_steps: DDIM only. False reproduces VideoCrafter2: timesteps ``arange(0, 1000, 1000 // steps)
      + 1``, which has more than ``steps`` entries when 1000 % steps != 0 (30 -> 31 steps, 991 down to 1;
      60 -> 63). True keeps exactly ``steps`` of them, the lowest ones (diffusers' DDIM 'leading' spacing
      with steps_offset=1): for 30 steps, 958 down to 1, so sampling starts below the top timestep 991.
      Schedules of kind 'diffusers' always run diffusers' own steps.
    schedule: the model's noise schedule and timestep spacing (:class:`vinf_jax.schedule.Schedule`;
      VideoCrafter2's by default, a diffusers pipeline's ``scheduler_config.json`` for its conversions).
  """

  name: str = "dpmpp_sde"
  steps: int = 30
  guidance: float = 12.0
  eta: float = 1.0
  ddim_exact_steps: bool = False
  turbo_origin: int = 50
  motion_scale: float = 0.05
  motion_cutoff: float = 0.5
  schedule: schedule_lib.Schedule = schedule_lib.VIDEOCRAFTER2

  @property
  def guided(self) -> bool:
    return self.name in GUIDED

  def validate(self) -> SamplerConfig:
    e: list[str] = []
    if self.name not in SAMPLERS:
      e.append(f"name={self.name!r}, expected one of {SAMPLERS}")
    if self.name == "turbo":
      if self.turbo_origin not in TURBO_ORIGINS:
        e.append(f"turbo_origin={self.turbo_origin!r}, expected one of {TURBO_ORIGINS}")
      if not (np.isfinite(self.motion_scale) and self.motion_scale >= 0):
        e.append(f"motion_scale={self.motion_scale!r}, expected a finite value >= 0")
      if not (np.isfinite(self.motion_cutoff) and 0 <= self.motion_cutoff <= 1):
        e.append(f"motion_cutoff={self.motion_cutoff!r}, expected a value in [0, 1]")
    # DDIM: 1000 // steps must be >= 2, else the top timestep is 1000 (VideoCrafter2 fails there too);
    # DPM-Solver: 1000 steps would repeat a timestep; turbo: at most every timestep of its grid.
    origin = self.turbo_origin if self.turbo_origin in TURBO_ORIGINS else max(TURBO_ORIGINS)
    max_steps = {"ddim": NUM_TRAIN_TIMESTEPS // 2, "turbo": origin}.get(self.name, NUM_TRAIN_TIMESTEPS - 1)
    if not (isinstance(self.steps, int | np.integer) and 1 <= self.steps <= max_steps):
      e.append(f"steps={self.steps!r}, expected an integer in 1..{max_steps} for {self.name!r}")
    elif self.name == "ddim" and (top := int(self._ddim_timesteps().max())) > 999:
      # e.g. S=3: arange(0, 1000, 333) + 1 ends at 1000, past the schedule (VideoCrafter2 fails too)
      e.append(
        f"steps={self.steps} gives the DDIM timestep {top} > 999 with uniform spacing "
        "arange(0, 1000, 1000 // steps) + 1; choose another step count"
      )
    if not (np.isfinite(self.guidance) and self.guidance >= 0):
      e.append(f"guidance={self.guidance!r}, expected a finite value >= 0")
    if not (np.isfinite(self.eta) and self.eta >= 0):
      e.append(f"eta={self.eta!r}, expected a finite value >= 0")
    if not isinstance(self.ddim_exact_steps, bool | np.bool_):
      e.append(f"ddim_exact_steps={self.ddim_exact_steps!r}, expected a bool")
    try:
      self.schedule.validate()
    except ValueError as err:
      e += [f"schedule: {ln.strip()[2:]}" for ln in str(err).splitlines()[1:]]
    else:
      if self.name == "turbo" and self.schedule.kind != "videocrafter2":
        e.append(f"sampler 'turbo' is T2V-Turbo's (VideoCrafter2's schedule), not for a {self.schedule.kind} schedule")
    if e:
      raise ValueError("invalid SamplerConfig:\n  - " + "\n  - ".join(e))
    return self

  def _ddim_timesteps(self) -> np.ndarray:
    if self.schedule.kind == "videocrafter2":
      return ddim_timesteps(int(self.steps), bool(self.ddim_exact_steps))
    return schedule_lib.ddim_timesteps(self.schedule, int(self.steps))


# ----------------------------------------------------------------------------------------------
# Plan: per-step constants


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerPlan:
  """Per-step constants of one sampling run, in sampling order (index 0 = the noisiest step).

  A pytree: the arrays are leaves (numpy on the host; pass the plan into ``jit`` as an argument
  or close over it), ``name`` and ``stochastic`` are static.

  Attributes:
    name: the sampler, 'ddim', 'dpmpp_sde' or 'turbo'.
    stochastic: whether any step uses noise (False: ``step`` accepts ``noise=None``).
    guided: classifier-free guidance (two UNet branches per step); False for 'turbo', whose UNet takes
      the guidance scale as an input (one call per step).
    timesteps: int32 [S], the UNet timestep of each step.
    guidance: float32 [], the classifier-free guidance scale (for 'turbo': the UNet's embedded w).
    motion: float32 [S], the motion scale of each step ('turbo' on a v2 UNet; zeros otherwise).
    x0_from_x, x0_from_eps: float32 [S], ``x0 = x0_from_x * x - x0_from_eps * e``.
    coef_x, coef_x0, coef_prev_x0, coef_eps, coef_noise: float32 [S], the update
      ``x' = coef_x x + coef_x0 x0 + coef_prev_x0 x0_prev + coef_eps e + coef_noise z``.
  """

  name: str
  stochastic: bool
  guided: bool
  timesteps: np.ndarray
  guidance: np.ndarray
  motion: np.ndarray
  x0_from_x: np.ndarray
  x0_from_eps: np.ndarray
  coef_x: np.ndarray
  coef_x0: np.ndarray
  coef_prev_x0: np.ndarray
  coef_eps: np.ndarray
  coef_noise: np.ndarray


_PLAN_META = ("name", "stochastic", "guided")
_PLAN_ARRAYS = tuple(f.name for f in dataclasses.fields(SamplerPlan) if f.name not in _PLAN_META)
jax.tree_util.register_dataclass(SamplerPlan, data_fields=list(_PLAN_ARRAYS), meta_fields=list(_PLAN_META))


@dataclasses.dataclass(frozen=True)
class SamplerState:
  """The sampler's carry (a pytree).

  Attributes:
    x: float32 [b, t, h, w, c], the current latent.
    x0: float32 [b, t, h, w, c], the data prediction of the last step (DPM-Solver's history;
      zeros before the first step; DDIM does not read it, but it is there for previews).
    i: int32 [], the index of the next step.
  """

  x: jax.Array
  x0: jax.Array
  i: jax.Array


jax.tree_util.register_dataclass(SamplerState, data_fields=["x", "x0", "i"], meta_fields=[])


def ddim_timesteps(steps: int, exact: bool = False) -> np.ndarray:
  """VideoCrafter2's 'uniform' DDIM timesteps, ascending: ``arange(0, 1000, 1000 // steps) + 1``.

  With ``exact`` only the first ``steps`` of them (see ``SamplerConfig.ddim_exact_steps``).
  """
  ts = np.arange(0, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS // steps) + 1
  return ts[:steps] if exact else ts


def dpm_timesteps(steps: int) -> np.ndarray:
  """diffusers' 'linspace' timestep spacing, descending: ``round(linspace(0, 999, steps + 1))[::-1][:-1]``.

  numpy rounds halves to even (832.5 -> 832), which is what diffusers gets.
  """
  return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def turbo_timesteps(steps: int, origin: int = 50) -> np.ndarray:
  """T2V-Turbo's few-step timesteps, descending: every ``origin // steps``-th of the grid
  ``[1..origin] * (1000 // origin) - 1`` from the top, the first ``steps`` of them.

  origin 50: 4 steps 999, 759, 519, 279; 8 steps 999, 879, ..., 159. origin 200: 4 steps 999, 749, 499, 249.
  """
  c = NUM_TRAIN_TIMESTEPS // origin
  grid = np.arange(1, origin + 1) * c - 1
  return grid[:: -(origin // steps)][:steps].astype(np.int64)


def _turbo_coefficients(cfg: SamplerConfig, abar: np.ndarray) -> dict[str, np.ndarray]:
  # The consistency step: x0 = (x - sqrt(1 - a) e) / sqrt(a); with s = 10 t, c_skip = 0.25 / (s^2 + 0.25) and
  # c_out = s / sqrt(s^2 + 0.25), denoised = c_out x0 + c_skip x (the stored x0, decoded at the end); then
  # x' = sqrt(a_next) denoised + sqrt(1 - a_next) z, except after the last step (x' = denoised).
  ts = turbo_timesteps(cfg.steps, cfg.turbo_origin)
  a = abar[ts]
  sc = TURBO_TIMESTEP_SCALING * ts.astype(np.float64)
  sd2 = TURBO_SIGMA_DATA**2
  c_skip, c_out = sd2 / (sc**2 + sd2), sc / np.sqrt(sc**2 + sd2)
  a_next = np.append(abar[ts[1:]], 1.0)  # 1: the last step adds no noise and keeps denoised as it is
  zeros = np.zeros_like(a)
  return {
    "timesteps": ts,
    "x0_from_x": c_out / np.sqrt(a) + c_skip,
    "x0_from_eps": c_out * np.sqrt(1.0 - a) / np.sqrt(a),
    "coef_x": zeros,
    "coef_x0": np.sqrt(a_next),
    "coef_prev_x0": zeros,
    "coef_eps": zeros,
    "coef_noise": np.sqrt(1.0 - a_next),
    "motion": np.where(ts >= NUM_TRAIN_TIMESTEPS * (1.0 - cfg.motion_cutoff), cfg.motion_scale, 0.0),
  }


def _ddim_coefficients(cfg: SamplerConfig, abar: np.ndarray, scale_arr: np.ndarray) -> dict[str, np.ndarray]:
  ts = ddim_timesteps(cfg.steps, cfg.ddim_exact_steps)  # ascending; VideoCrafter2 indexes it from below
  a_t = abar[ts]
  a_prev = np.concatenate([abar[:1], abar[ts[:-1]]])  # the lowest step goes to abar[0], not to 1
  s_t = scale_arr[ts]
  s_prev = np.concatenate([scale_arr[:1], scale_arr[ts[:-1]]])
  sigma = cfg.eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
  zeros = np.zeros_like(a_t)
  coef = {
    "timesteps": ts,
    "x0_from_x": 1.0 / (np.sqrt(a_t) * s_t),
    "x0_from_eps": np.sqrt(1.0 - a_t) / (np.sqrt(a_t) * s_t),
    "coef_x": zeros,
    "coef_x0": np.sqrt(a_prev) * s_prev,
    "coef_prev_x0": zeros,
    "coef_eps": np.sqrt(1.0 - a_prev - sigma**2),
    "coef_noise": sigma,
  }
  return {k: v[::-1] for k, v in coef.items()}  # sampling order: noisiest first


def _dpmpp_sde_coefficients(cfg: SamplerConfig, abar: np.ndarray) -> dict[str, np.ndarray]:
  ts = schedule_lib.dpm_timesteps(cfg.schedule, cfg.steps)
  n = len(ts)
  # VP schedule at the steps plus the final sigma = 0 ("final_sigmas_type zero"): alpha = 1, sigma = 0.
  alpha = np.append(np.sqrt(abar[ts]), 1.0)
  sigma = np.append(np.sqrt(1.0 - abar[ts]), 0.0)
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)  # lambda = +inf at the end
  h = lam[1:] - lam[:-1]  # [n], the last one is +inf
  e1 = np.exp(-h)  # 0 at the last step
  coef_x = sigma[1:] / sigma[:-1] * e1
  coef_d = alpha[1:] * (1.0 - e1 * e1)  # alpha_next (1 - e^-2h)
  coef_noise = sigma[1:] * np.sqrt(1.0 - e1 * e1)
  # Multistep order: the first step has no history and the step to sigma = 0 is always first order
  # (diffusers' lower_order_final with final_sigmas_type "zero", whatever the number of steps). With
  # solver_order 2 the "< 15 steps" rule only changes the second-to-last step, which is second order
  # either way. Every other step is the second-order midpoint update.
  w0 = np.ones(n)
  w1 = np.zeros(n)
  second = np.arange(n)
  second = second[(second >= 1) & (second <= n - 2)]
  r = h[second - 1] / h[second]
  w0[second] = 1.0 + 0.5 / r
  w1[second] = -0.5 / r
  x0_x, x0_e, _, _ = schedule_lib.prediction(cfg.schedule, alpha[:-1], sigma[:-1])
  return {
    "timesteps": ts,
    "x0_from_x": x0_x,
    "x0_from_eps": x0_e,
    "coef_x": coef_x,
    "coef_x0": coef_d * w0,
    "coef_prev_x0": coef_d * w1,
    "coef_eps": np.zeros(n),
    "coef_noise": coef_noise,
  }


def make_plan(cfg: SamplerConfig, *, alphas_cumprod: np.ndarray | None = None) -> SamplerPlan:
  """Precomputes every per-step constant of ``cfg`` on the host (float64, stored float32).

  Args:
    cfg: the sampler configuration (validated here).
    alphas_cumprod: [1000] the schedule's alpha-bar; defaults to that of ``cfg.schedule`` (VideoCrafter2's:
      ``schedule()["alphas_cumprod"]``, float32, as the checkpoint holds it). Tests pass diffusers' own here.
  """
  cfg.validate()
  buffers = schedule()
  abar = schedule_lib.alphas_cumprod(cfg.schedule) if alphas_cumprod is None else np.asarray(alphas_cumprod)
  if abar.shape != (NUM_TRAIN_TIMESTEPS,):
    raise ValueError(f"alphas_cumprod has shape {abar.shape}, expected ({NUM_TRAIN_TIMESTEPS},)")
  abar = abar.astype(np.float64)
  if cfg.name == "ddim" and cfg.schedule.kind != "videocrafter2":
    coef = schedule_lib.ddim_coefficients(cfg.schedule, cfg.steps, cfg.eta, abar)
  elif cfg.name == "ddim":
    coef = _ddim_coefficients(cfg, abar, buffers["scale_arr"].astype(np.float64))
  elif cfg.name == "turbo":
    coef = _turbo_coefficients(cfg, abar)
  else:
    coef = _dpmpp_sde_coefficients(cfg, abar)
  coef.setdefault("motion", np.zeros(len(coef["timesteps"])))
  arrays = {k: np.ascontiguousarray(v, dtype=np.int32 if k == "timesteps" else np.float32) for k, v in coef.items()}
  bad = [k for k, v in arrays.items() if not np.all(np.isfinite(v))]
  if bad:
    raise ValueError(f"non-finite sampler coefficients {bad} for {cfg}")
  return SamplerPlan(
    name=cfg.name,
    stochastic=bool(np.any(arrays["coef_noise"] != 0)),
    guided=cfg.guided,
    guidance=np.asarray(cfg.guidance, np.float32),
    **arrays,
  )


# ----------------------------------------------------------------------------------------------
# The step


def num_steps(plan: SamplerPlan) -> int:
  """Number of sampling steps (may exceed the requested ``steps`` for VideoCrafter2's DDIM)."""
  return int(np.shape(plan.timesteps)[0])


def timestep(plan: SamplerPlan, i: int | jax.Array) -> jax.Array:
  """int32 [], the UNet timestep of sampling step ``i`` (``i`` may be traced)."""
  return jnp.asarray(plan.timesteps)[i]


def init(plan: SamplerPlan, x_T: jax.Array) -> SamplerState:
  """The state before the first step; ``x_T`` [b, t, h, w, c] is standard normal noise (both samplers)."""
  del plan  # both samplers start from unit-variance noise (diffusers' init_noise_sigma is 1)
  x = jnp.asarray(x_T, jnp.float32)
  return SamplerState(x=x, x0=jnp.zeros_like(x), i=jnp.zeros((), jnp.int32))


def step(
  plan: SamplerPlan,
  state: SamplerState,
  eps_uncond: jax.Array | None,
  eps_cond: jax.Array,
  noise: jax.Array | None = None,
) -> SamplerState:
  """One sampling step from ``state.i``; works under ``jit`` with a traced ``state.i``.

  Args:
    plan: from :func:`make_plan`.
    state: the carry; ``x`` is what the UNet saw at ``timestep(plan, state.i)``.
    eps_uncond: the unconditional UNet output [b, t, h, w, c], or None for no guidance (``e = eps_cond``).
    eps_cond: the conditional UNet output [b, t, h, w, c] (any float dtype; the update runs in x's dtype).
    noise: standard normal [b, t, h, w, c] for this step (:func:`frame_noise`); may be None when
      ``plan.stochastic`` is False (DDIM with eta 0).

  Returns:
    The state after the step, ``i`` advanced by one.
  """
  i = state.i
  dt = state.x.dtype
  c = lambda name: jnp.asarray(getattr(plan, name), dt)[i]
  e = eps_cond.astype(dt)
  if eps_uncond is not None:
    e_u = eps_uncond.astype(dt)
    e = e_u + jnp.asarray(plan.guidance, dt) * (e - e_u)
  x0 = c("x0_from_x") * state.x - c("x0_from_eps") * e
  x = c("coef_x") * state.x + c("coef_x0") * x0 + c("coef_prev_x0") * state.x0 + c("coef_eps") * e
  if noise is not None:
    x = x + c("coef_noise") * noise.astype(dt)
  elif plan.stochastic:
    raise ValueError(f"the {plan.name!r} plan adds noise: pass `noise` (frame_noise) to step()")
  return SamplerState(x=x, x0=x0, i=i + 1)


# ----------------------------------------------------------------------------------------------
# Noise that does not depend on the device split


def _frames_normal(key: jax.Array, frame_index: jax.Array, shape_per_frame: Sequence[int], dtype) -> jax.Array:
  frame_index = jnp.asarray(frame_index, jnp.int32)
  one = lambda f: jax.random.normal(jax.random.fold_in(key, f), tuple(shape_per_frame), dtype)
  return jax.vmap(one)(frame_index)  # [t, *shape_per_frame]


def initial_noise(
  seed: int | jax.Array,
  frame_index: jax.Array,
  shape_per_frame: Sequence[int],
  *,
  video_index: int | jax.Array = 0,
  dtype=jnp.float32,
) -> jax.Array:
  """x_T of the given global frames: [t, *shape_per_frame], e.g. [t, h, w, c].

  Frame f of video ``video_index`` always gets ``normal(fold_in(key(seed), stream 0, video, f))``, so
  a device holding frames [r*T, (r+1)*T) draws exactly its part of the whole video's noise. Add the
  batch axis with ``[None]`` (one video) or use :func:`batch_initial_noise`. Traceable in every argument
  but ``shape_per_frame``.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _INITIAL_STREAM), video_index)
  return _frames_normal(key, frame_index, shape_per_frame, dtype)


def frame_noise(
  seed: int | jax.Array,
  step: int | jax.Array,
  frame_index: jax.Array,
  shape_per_frame: Sequence[int],
  *,
  video_index: int | jax.Array = 0,
  dtype=jnp.float32,
) -> jax.Array:
  """Noise of sampling step ``step`` (the index ``i``, not the timestep) for the given global frames.

  Returns [t, *shape_per_frame], drawn as ``normal(fold_in(key(seed), stream 1, step, video, f))``
  per frame f, so it depends only on (seed, step, video, global frame index). ``frame_index`` may be
  traced, e.g. ``axis_index('frames') * t_local + arange(t_local)`` under ``shard_map``.
  """
  key = jax.random.fold_in(jax.random.key(seed), _STEP_STREAM)
  key = jax.random.fold_in(jax.random.fold_in(key, step), video_index)
  return _frames_normal(key, frame_index, shape_per_frame, dtype)


def _per_video(noise_of_video, batch: int, first_video: int | jax.Array) -> jax.Array:
  """``noise_of_video(v)`` stacked over videos ``v = first_video .. first_video + batch - 1`` (int32 indices)."""
  videos = first_video + jnp.arange(batch, dtype=jnp.int32)
  return jax.vmap(noise_of_video)(videos)


def batch_initial_noise(
  seed: int | jax.Array,
  frame_index: jax.Array,
  shape_per_frame: Sequence[int],
  batch: int,
  *,
  first_video: int | jax.Array = 0,
  dtype=jnp.float32,
) -> jax.Array:
  """[b, t, *shape_per_frame]: :func:`initial_noise` of videos ``first_video .. first_video + b - 1``."""
  return _per_video(
    lambda v: initial_noise(seed, frame_index, shape_per_frame, video_index=v, dtype=dtype), batch, first_video
  )


def batch_frame_noise(
  seed: int | jax.Array,
  step: int | jax.Array,
  frame_index: jax.Array,
  shape_per_frame: Sequence[int],
  batch: int,
  *,
  first_video: int | jax.Array = 0,
  dtype=jnp.float32,
) -> jax.Array:
  """[b, t, *shape_per_frame]: :func:`frame_noise` of videos ``first_video .. first_video + b - 1``."""
  return _per_video(
    lambda v: frame_noise(seed, step, frame_index, shape_per_frame, video_index=v, dtype=dtype), batch, first_video
  )
