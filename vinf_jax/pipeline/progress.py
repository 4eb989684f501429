"""Progress of a run: where its lines go (process 0 prints), the per-step report and its callback record."""

from __future__ import annotations

import dataclasses

import jax


def log0(msg: str) -> None:
  """Print ``msg`` on process 0 only (the default ``log`` of every stage)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


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


def clock(seconds: float) -> str:
  """``M:SS``, or ``H:MM:SS`` from an hour."""
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def step_line(info: StepInfo, frames: int) -> str:
  """The progress line of one sampling step."""
  return (
    f"step {info.step:3d}/{info.num_steps}  t={info.timestep:4d}  {info.seconds_per_step:6.2f} s/step  "
    f"{frames / info.seconds_per_step:7.1f} frames/s  elapsed {clock(info.elapsed_s)}  ETA {clock(info.eta_s)}"
  )
