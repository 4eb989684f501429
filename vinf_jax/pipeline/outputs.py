"""The outputs of a run: the video, its JSON sidecar and the latents, written together or not at all.

Process 0 writes each file under a temporary name and renames them into place together
(:class:`vinf_jax.video_io.AtomicFiles`); when a write fails, what was sampled is saved as a resumable state
(:func:`rescue`) and the error says how to write the video from it. Also here: the lock that keeps two runs
from writing the same paths, and the sidecar's record of the software versions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import TYPE_CHECKING

import jax
import numpy as np

from vinf_jax import parallel, sampling, video_io
from vinf_jax.config import ModelConfig
from vinf_jax.pipeline import interrupts
from vinf_jax.pipeline import state as state_lib

if TYPE_CHECKING:
  from vinf_jax.pipeline.settings import GenerationConfig


RESCUE_PREFIX = "vinf_jax-rescue-"


def one_run_per_output(fn):
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


def from_process0(value: int) -> int:
  """Process 0's ``value`` (an int32) on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def write_outputs(
  cfg: GenerationConfig,
  video,
  latents: np.ndarray,
  sidecar: dict,
  timings: dict,
  t_start: float,
  state: sampling.SamplerState,
) -> str | None:
  """Process 0 writes the latents, the video and its sidecar, renamed into place together (or none).

  ``video``: uint8 frames ``[N, H, W, 3]``, or a :class:`.decoded.Decoded` whose pieces are still being
  decoded: the mp4 is encoded as they come (``timings``: ``decode`` until the last piece was on the host,
  ``write`` what the files took after it). When a write fails, files already at those paths keep what they
  held, the partial files are removed and the final state is saved (:func:`rescue`) so that nothing sampled
  is lost; then WriteError is raised (on every process) saying where the state went and how to write the
  video from it. A device error while decoding (out of memory) goes up as it is, the partial files removed.
  """
  t = time.perf_counter()
  out, failed = None, None
  n, h, w = video.shape[:3]
  sidecar["output"] = {
    "path": os.path.abspath(cfg.output.rstrip("/")) if cfg.output else None,
    "frames": int(n),
    "height": int(h),
    "width": int(w),
    "export_fps": cfg.export_fps,
    "latents": os.path.abspath(cfg.save_latents) if cfg.save_latents else None,
    "latents_layout": "float32 [1, frames, height/8, width/8, 4], scale_factor * z (as the UNet sees them)",
  }
  if jax.process_index() == 0:
    try:
      # a signal stops the writes at once (their partial files removed), not the renames into place after them
      with video_io.AtomicFiles(passthrough=(jax.errors.JaxRuntimeError,)) as files, interrupts.at_once():
        if cfg.save_latents:
          video_io.write_npy(cfg.save_latents, latents, files=files)
        if cfg.output:
          frames = video.pieces() if hasattr(video, "pieces") else video
          out = video_io.write_video(cfg.output, frames, cfg.export_fps, files=files)
        _times(video, timings, t, t_start)
        if cfg.output:
          video_io.write_json(video_io.sidecar_path(cfg.output), sidecar, files=files)
    except video_io.WriteError as err:
      if interrupts.pending() and jax.process_count() == 1:  # Ctrl-C reaches ffmpeg too: its write fails
        raise interrupts.Stop(interrupts.pending()) from err
      failed = err
  if not from_process0(failed is not None):
    if "total" not in timings:
      _times(video, timings, t, t_start)
    return out
  what = failed or "process 0 could not write the outputs"
  raise video_io.WriteError(f"{what}; the files already there are unchanged; {rescue(cfg, state, latents)}")


def _times(video, timings: dict, t: float, t_start: float) -> None:
  """The write's timings: with a decode that ran during the write, the decode's share and the rest."""
  now = time.perf_counter()
  done = getattr(video, "done_at", None)
  if done is not None and done > t:  # decoded while written
    timings["decode"] = done - video.started
    timings["decode_write"] = now - video.started
  timings["write"] = now - max(t, done or t)
  timings["total"] = now - t_start


def rescue(cfg: GenerationConfig, state: sampling.SamplerState, latents: np.ndarray | None = None) -> str:
  """Save what a run computed when its outputs could not be written; returns where, as advice.

  The final sampler state goes where :func:`save_resumable` puts it, as a state that ``resume`` turns into
  the video without sampling again. Several processes without a ``state_dir`` (each host its own temporary
  directory) get the latents as a ``.npy`` on process 0 instead.
  """
  where, why = save_resumable(cfg, state)
  if where:
    return (
      f"the sampled latents are saved as a state in {where}: run the same command with --resume={where} and "
      "an --output where there is room (it only decodes and writes)"
    )
  if cfg.state_dir or cfg.resume or jax.process_count() == 1:
    return f"saving the sampled state failed too ({why})"
  if jax.process_index() != 0:
    return "process 0 saved the latents"
  path = rescue_dir(cfg) + ".npy"
  try:
    video_io.write_npy(path, latents if latents is not None else parallel.gather_to_host(state.x))
  except video_io.WriteError as err:
    return f"saving the latents failed too ({err})"
  return f"the final latents (float32 [1, frames, h/8, w/8, 4], scale_factor * z) are saved in {path} on process 0"


def rescue_dir(cfg: GenerationConfig) -> str:
  """A new directory's path under the system's temporary directory, the same on every process (a collective)."""
  import tempfile

  stem = os.path.splitext(os.path.basename((cfg.output or cfg.save_latents or "video").rstrip("/")))[0]
  token = from_process0(int.from_bytes(os.urandom(3), "little"))  # < 2**24: an int32 when broadcast
  return os.path.join(tempfile.gettempdir(), f"{RESCUE_PREFIX}{stem}-{token:06x}")


def save_resumable(cfg: GenerationConfig, state: sampling.SamplerState) -> tuple[str | None, str]:
  """Save ``state`` where ``resume`` finds it: ``state_dir`` (or ``resume``), else, or when that save fails,
  a new directory under the system's temporary directory (one process only: several need a shared
  ``state_dir``). Returns (the directory, "") or (None, why not). A state of this step already saved and
  complete in ``state_dir`` is not saved again."""
  state_dir = cfg.state_dir or cfg.resume
  temp = rescue_dir(cfg)
  if state_dir and from_process0(state_lib.is_saved(state_dir, int(np.asarray(state.i)))):
    return state_dir, ""
  failures = []
  for where in [state_dir] * bool(state_dir) + [temp] * (jax.process_count() == 1):
    try:
      state_lib.save_state(where, state, cfg)
    except video_io.WriteError as err:
      failures.append(str(err))
      continue
    return where, ""
  return None, "; ".join(failures) or "several processes need a --state_dir to save the state in"


def make_sidecar(cfg: GenerationConfig, plan, model: ModelConfig, num_devices: int, timings: dict) -> dict:
  """The JSON sidecar of a run (its ``timings_s`` is ``timings``, filled in as the run goes on)."""
  temporal = cfg.temporal_config()
  return {
    "prompts": list(cfg.prompts),
    "negative_prompt": cfg.negative_prompt,
    "seed": cfg.seed,
    "settings": dataclasses.asdict(cfg)
    | {"dtype": plan.dtype, "model": model.name, "num_devices": num_devices, "guidance": cfg.resolved_guidance()}
    | {k: getattr(temporal, k) for k in ("global_phase_from", "local_phase_below")}
    | {"frame_chunk": plan.frame_chunk, "decode_chunk": plan.decode_chunk},
    "memory": plan.memory.as_dict(),
    "model": json.loads(model.to_json()),
    "devices": {
      "count": num_devices,
      "processes": jax.process_count(),
      "platform": jax.default_backend(),
      "kind": jax.devices()[0].device_kind,
    },
    "versions": versions(),
    "timings_s": timings,
  }


def versions() -> dict[str, str]:
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
