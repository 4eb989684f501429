"""The noise schedule a model was trained with, and how its samplers space their timesteps.

Two kinds (:attr:`Schedule.kind`):

* ``videocrafter2``: LatentDiffusion's own (architecture notes, section 7): SD's scaled-linear betas,
  DDIM with ``scale_arr`` over the uniform timesteps ``arange(0, 1000, 1000 // S) + 1`` (more than S of
  them when 1000 % S != 0, unless ``ddim_exact_steps``), and Video-Infinity's DPM-Solver++ SDE over
  diffusers' 'linspace' timesteps.
* ``diffusers``: a diffusers pipeline folder's ``scheduler/scheduler_config.json`` (ModelScope, ZeroScope and
  their fine-tunes): its betas and timestep spacing, applied as ``DDIMScheduler.from_config`` (for 'ddim') and
  ``DPMSolverMultistepScheduler.from_config(..., algorithm_type="sde-dpmsolver++")`` (for 'dpmpp_sde') would:
  a spacing the file does not name is that scheduler's default ('leading' for DDIM, 'linspace' for
  DPM-Solver), and DDIM steps from ``t`` to ``t - 1000 // S`` (``final_alpha_cumprod`` below 0). No
  ``scale_arr``.

Everything here is numpy on the host, float64 inside; no torch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
KINDS = ("videocrafter2", "diffusers")
BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("", "leading", "linspace", "trailing")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The model's diffusion schedule (see the module docstring).

  Attributes:
    kind: 'videocrafter2' or 'diffusers'.
    beta_start: first beta (SD: 0.00085).
    beta_end: last beta (SD: 0.012).
    beta_schedule: 'scaled_linear' (``linspace(sqrt(start), sqrt(end), 1000) ** 2``) or 'linear'.
    prediction_type: what the UNet predicts: 'epsilon' (the noise) or 'v_prediction'
      (``v = sqrt(abar) eps - sqrt(1 - abar) x0``).
    timestep_spacing: 'leading', 'linspace' or 'trailing'; '' = each sampler's default (kind 'diffusers') or
      VideoCrafter2's own (kind 'videocrafter2').
    steps_offset: added to 'leading' timesteps (diffusers; 1 in the ModelScope family).
    set_alpha_to_one: DDIM's last step goes to abar = 1 (True) or to abar[0] (False, the ModelScope family).
  """

  kind: str = "videocrafter2"
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"
  timestep_spacing: str = ""
  steps_offset: int = 1
  set_alpha_to_one: bool = False

  def validate(self) -> Schedule:
    e = []
    if self.kind not in KINDS:
      e.append(f"kind={self.kind!r}, expected one of {KINDS}")
    if self.beta_schedule not in BETA_SCHEDULES:
      e.append(f"beta_schedule={self.beta_schedule!r}, expected one of {BETA_SCHEDULES}")
    if not (0 < self.beta_start < self.beta_end < 1):
      e.append(f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}: expected 0 < start < end < 1")
    if self.prediction_type not in PREDICTION_TYPES:
      e.append(f"prediction_type={self.prediction_type!r}, expected one of {PREDICTION_TYPES}")
    if self.timestep_spacing not in SPACINGS:
      e.append(f"timestep_spacing={self.timestep_spacing!r}, expected one of {SPACINGS}")
    if not (isinstance(self.steps_offset, int) and 0 <= self.steps_offset < NUM_TRAIN_TIMESTEPS):
      e.append(f"steps_offset={self.steps_offset!r}, expected an integer in 0..999")
    if self.kind == "videocrafter2" and (self.timestep_spacing, self.prediction_type) != ("", "epsilon"):
      e.append("kind='videocrafter2' has its own spacing and epsilon prediction (timestep_spacing '', epsilon)")
    if e:
      raise ValueError("invalid Schedule:\n  - " + "\n  - ".join(e))
    return self


VIDEOCRAFTER2 = Schedule()
# The ModelScope family's scheduler_config.json (DDIMScheduler, diffusers 0.17): no timestep_spacing key.
MODELSCOPE = Schedule(kind="diffusers")


def betas(s: Schedule) -> np.ndarray:
  """float64 [1000]."""
  if s.beta_schedule == "scaled_linear":
    return np.linspace(s.beta_start**0.5, s.beta_end**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
  if s.beta_schedule == "linear":
    return np.linspace(s.beta_start, s.beta_end, NUM_TRAIN_TIMESTEPS, dtype=np.float64)
  raise ValueError(f"beta_schedule={s.beta_schedule!r}, expected one of {BETA_SCHEDULES}")


def alphas_cumprod(s: Schedule) -> np.ndarray:
  """float32 [1000], computed in float64 (as LatentDiffusion's register_schedule, then stored float32)."""
  return np.cumprod(1.0 - betas(s)).astype(np.float32)


def ddim_timesteps(s: Schedule, steps: int) -> np.ndarray:
  """diffusers ``DDIMScheduler.set_timesteps``, descending (kind 'diffusers')."""
  n = NUM_TRAIN_TIMESTEPS
  spacing = s.timestep_spacing or "leading"
  if spacing == "linspace":
    return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
  if spacing == "leading":
    return (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + s.steps_offset
  return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1  # trailing


def dpm_timesteps(s: Schedule, steps: int) -> np.ndarray:
  """diffusers ``DPMSolverMultistepScheduler.set_timesteps`` (no Karras sigmas, no clipped lambda), descending."""
  n = NUM_TRAIN_TIMESTEPS
  spacing = s.timestep_spacing or "linspace"
  if spacing == "linspace":
    # numpy rounds halves to even (832.5 -> 832), which is what diffusers gets
    return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
  if spacing == "leading":
    ratio = n // (steps + 1)
    return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + s.steps_offset
  return np.arange(n, 0, -n / steps).round().astype(np.int64) - 1  # trailing


def ddim_prev_alphas(s: Schedule, ts: np.ndarray, steps: int, abar: np.ndarray) -> np.ndarray:
  """abar of DDIM's previous timestep ``t - 1000 // steps`` per step (``final_alpha_cumprod`` below 0)."""
  prev = ts - NUM_TRAIN_TIMESTEPS // steps
  final = 1.0 if s.set_alpha_to_one else abar[0]
  return np.where(prev >= 0, abar[np.maximum(prev, 0)], final)


def prediction(s: Schedule, alpha: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, ...]:
  """(x0_from_x, x0_from_out, eps_from_x, eps_from_out): ``x0 = a x - b out`` and ``eps = c x + d out`` for the
  UNet output ``out`` of ``s.prediction_type``, where ``x = alpha x0 + sigma eps``."""
  if s.prediction_type == "v_prediction":  # v = alpha eps - sigma x0
    return alpha, sigma, sigma, alpha
  return 1.0 / alpha, sigma / alpha, np.zeros_like(alpha), np.ones_like(alpha)


def ddim_coefficients(s: Schedule, steps: int, eta: float, abar: np.ndarray) -> dict[str, np.ndarray]:
  """diffusers' ``DDIMScheduler.step`` as the sampler's per-step coefficients (``vinf_jax.sampling``'s update):
  from t to ``t - 1000 // steps``, ``x' = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z``."""
  ts = ddim_timesteps(s, steps)  # descending: sampling order
  a_t = abar[ts]
  a_prev = ddim_prev_alphas(s, ts, steps, abar)
  sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
  c_dir = np.sqrt(1.0 - a_prev - sigma**2)
  x0_x, x0_out, eps_x, eps_out = prediction(s, np.sqrt(a_t), np.sqrt(1.0 - a_t))
  return {
    "timesteps": ts,
    "x0_from_x": x0_x,
    "x0_from_eps": x0_out,
    "coef_x": c_dir * eps_x,
    "coef_x0": np.sqrt(a_prev),
    "coef_prev_x0": np.zeros_like(a_t),
    "coef_eps": c_dir * eps_out,
    "coef_noise": sigma,
  }
