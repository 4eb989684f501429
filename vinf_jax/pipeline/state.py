"""Resumable run state: the settings' fingerprint, saving and restoring the sampler state with checksums.

A state directory holds ``run.json`` (the fingerprint of the settings the state depends on) and up to two
orbax checkpoints ``step_NNNNN`` of the sampler state (``x``, ``x0``, ``i``), each with a
``checksums.json`` (sha256 per array, and of the fingerprint the arrays were made under) written after
orbax finalised it: a checkpoint without one never completed. :func:`restore_state` takes the newest
checkpoint whose checksums hold, else the one before it.
:func:`check_state_dirs` is the part of :func:`vinf_jax.pipeline.validate` about ``state_dir`` and
``resume``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from vinf_jax import parallel, sampling, video_io
from vinf_jax.pipeline.progress import log0

if TYPE_CHECKING:
  from vinf_jax.pipeline.settings import GenerationConfig

STATE_META = "run.json"
STATE_PREFIX = "step_"
STATE_CHECKSUMS = "checksums.json"


def fingerprint(cfg: GenerationConfig) -> dict:
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


def fingerprint_digest(fp: dict) -> str:
  """sha256 of a fingerprint as JSON (keys sorted): each checkpoint's ``checksums.json`` records the one of
  the settings its arrays were made with, so a ``run.json`` copied from another run cannot pass them off."""
  return hashlib.sha256(json.dumps(json.loads(json.dumps(fp)), sort_keys=True).encode()).hexdigest()


def check_state_dirs(cfg: GenerationConfig, e: list[str]) -> None:
  """Append to ``e`` what is wrong with ``state_dir`` / ``resume`` for these settings (validation)."""
  state_dir = cfg.state_dir or cfg.resume
  if (cfg.save_state_every or cfg.stop_after) and not state_dir:
    e.append("save_state_every / stop_after need state_dir (or resume) to save the state in")
  if state_dir and (cfg.save_state_every or cfg.stop_after or cfg.state_dir):
    try:
      video_io.check_writable(state_dir, "state_dir" if cfg.state_dir else "resume", reuse=True)
    except ValueError as err:
      e.append(str(err))
  if cfg.state_dir and os.path.isdir(cfg.state_dir):
    if latest_state(cfg.state_dir) and os.path.abspath(cfg.state_dir) != os.path.abspath(cfg.resume or "//"):
      e.append(
        f"state_dir={cfg.state_dir!r} already holds saved state: pass resume={cfg.state_dir!r} to continue it, "
        "or choose an empty directory"
      )
  if not cfg.resume:
    return
  if not os.path.isdir(cfg.resume) or not os.path.isfile(os.path.join(cfg.resume, STATE_META)):
    e.append(f"resume={cfg.resume!r} is not a state directory (no {STATE_META}); expected one written by --state_dir")
    return
  if latest_state(cfg.resume) is None:
    e.append(f"resume={cfg.resume!r} holds no completed state checkpoint")
    return
  try:
    saved = read_fingerprint(cfg.resume)
  except ValueError as err:
    e.append(str(err))
    return
  now = json.loads(json.dumps(fingerprint(cfg)))
  saved = {"global_frames": "video"} | saved  # states saved before the setting existed
  diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
  if diff:
    e.append(
      f"resume={cfg.resume!r} was saved by a run with other settings: "
      + "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
    )


def saved_states(state_dir: str) -> list[str]:
  """The complete state checkpoints in ``state_dir``, newest first."""
  if not os.path.isdir(state_dir):
    return []
  # orbax finalises a checkpoint by renaming its temporary directory: only complete ones carry the name.
  steps = [n for n in os.listdir(state_dir) if n.startswith(STATE_PREFIX) and n[len(STATE_PREFIX) :].isdigit()]
  steps.sort(key=lambda n: int(n[len(STATE_PREFIX) :]), reverse=True)
  return [os.path.join(state_dir, n) for n in steps]


def is_saved(state_dir: str, step: int) -> bool:
  """Whether ``state_dir`` holds a completed checkpoint of ``step`` (one with its checksums)."""
  return os.path.isfile(os.path.join(state_dir, f"{STATE_PREFIX}{step:05d}", STATE_CHECKSUMS))


def remove_stale_tmp(state_dir: str) -> list[str]:
  """Remove orbax's unfinished checkpoints (``step_N.orbax-checkpoint-tmp*``, left by a kill during a save) from
  ``state_dir``: the run holds the directory's lock, so no save of another run is under way there. Process 0."""
  if jax.process_index() != 0 or not os.path.isdir(state_dir):
    return []
  stale = [n for n in os.listdir(state_dir) if n.startswith(STATE_PREFIX) and ".orbax-checkpoint-tmp" in n]
  for n in stale:
    shutil.rmtree(os.path.join(state_dir, n), ignore_errors=True)
  return stale


def remove_states(state_dir: str) -> list[str]:
  """After the video of these states was written: remove them (``run.json`` when it is a state's, and the
  ``step_*`` checkpoints, finished or not) and the directory when nothing else is in it; any other file stays.
  Process 0. Returns the names removed."""
  if jax.process_index() != 0 or not os.path.isdir(state_dir):
    return []
  removed = []
  for n in sorted(os.listdir(state_dir)):
    if n.startswith(STATE_PREFIX) and os.path.isdir(os.path.join(state_dir, n)):
      shutil.rmtree(os.path.join(state_dir, n), ignore_errors=True)
      removed.append(n)
  try:
    read_fingerprint(state_dir)  # only a run.json that is a state's
    os.unlink(os.path.join(state_dir, STATE_META))
    removed.append(STATE_META)
  except (ValueError, OSError):
    pass
  with contextlib.suppress(OSError):
    os.rmdir(state_dir)  # only when empty
  return removed


def latest_state(state_dir: str) -> str | None:
  states = saved_states(state_dir)
  return states[0] if states else None


def read_fingerprint(state_dir: str) -> dict:
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


def checksums(arrays: dict) -> dict:
  """sha256 of each array's bytes (gathered whole on every process), with its shape and dtype."""
  out = {}
  for k, a in arrays.items():
    h = np.ascontiguousarray(parallel.gather_to_host(a))
    out[k] = {"sha256": hashlib.sha256(h.tobytes()).hexdigest(), "shape": list(h.shape), "dtype": str(h.dtype)}
  return out


def save_state(state_dir: str, state: sampling.SamplerState, cfg: GenerationConfig) -> str:
  """Save ``state`` as ``state_dir/step_NNNNN`` with a checksum per array; keep it and the previous state.

  Raises :class:`vinf_jax.video_io.WriteError` (the partial checkpoint removed) when the save fails.
  """
  import orbax.checkpoint as ocp

  i = int(np.asarray(state.i))
  path = os.path.abspath(os.path.join(state_dir, f"{STATE_PREFIX}{i:05d}"))
  arrays = _state_arrays(state)
  sums = checksums(arrays)
  try:
    if jax.process_index() == 0:
      os.makedirs(state_dir, exist_ok=True)
      remove_stale_tmp(state_dir)
      meta = os.path.join(state_dir, STATE_META)
      if not os.path.exists(meta):
        video_io.write_json(meta, {"fingerprint": fingerprint(cfg)})
    with quiet_orbax():  # a failed save: the WriteError below is its one line
      ckptr = ocp.StandardCheckpointer()
      ckptr.save(path, arrays, force=True)
      ckptr.wait_until_finished()
    if jax.process_index() == 0:
      video_io.write_json(
        os.path.join(path, STATE_CHECKSUMS),
        {"step": i, "arrays": sums, "fingerprint": fingerprint_digest(fingerprint(cfg))},
      )
  except Exception as err:
    if jax.process_index() == 0:
      for n in os.listdir(state_dir) if os.path.isdir(state_dir) else []:
        if n == os.path.basename(path) or n.startswith(os.path.basename(path) + "."):  # with orbax's tmp dirs
          shutil.rmtree(os.path.join(state_dir, n), ignore_errors=True)
    raise video_io.WriteError(
      f"could not save the state of step {i} in state_dir={state_dir!r}: {_os_reason(err)}"
    ) from err
  if jax.process_index() == 0:
    _keep_newest_two(state_dir, path, i)
  return path


def _keep_newest_two(state_dir: str, path: str, i: int) -> None:
  """Keep the state just saved and the newest complete one before it (the fallback when this one is damaged);
  newer ones are what a resume from an older state (after a damaged newest one) has replaced, and an older
  one without its checksums (a save killed before it completed) is no fallback."""
  steps = [int(os.path.basename(p)[len(STATE_PREFIX) :]) for p in saved_states(state_dir)]
  older = [os.path.join(state_dir, f"{STATE_PREFIX}{s:05d}") for s in steps if s < i and is_saved(state_dir, s)]
  keep = {path} | {os.path.abspath(p) for p in older[:1]}
  for n in os.listdir(state_dir):
    old = os.path.abspath(os.path.join(state_dir, n))
    if n.startswith(STATE_PREFIX) and old not in keep:
      shutil.rmtree(old, ignore_errors=True)


def restore_state(
  state_dir: str,
  mesh: jax.sharding.Mesh,
  latent_shape,
  log: Callable[[str], None] = log0,
  settings: dict | None = None,
) -> sampling.SamplerState:
  """The newest saved state of ``state_dir`` whose checksums hold, else the one before it with a warning;
  ValueError naming the directory, each step and what is wrong when none can be used. With ``settings`` (the
  resuming run's :func:`fingerprint`) a state whose arrays were made under other settings is not used (states
  saved before checkpoints recorded theirs are taken as they are). Removes orbax's unfinished checkpoints."""
  problems = []
  remove_stale_tmp(state_dir)
  digest = fingerprint_digest(settings) if settings is not None else None
  for path in saved_states(state_dir):
    step = int(os.path.basename(path)[len(STATE_PREFIX) :])
    try:
      state = _restore_checked(path, step, mesh, latent_shape, digest)
    except ValueError as err:
      problems.append(f"step {step} ({os.path.basename(path)}): {err}")
      continue
    if problems:
      log(f"warning: resume={state_dir!r}: {'; '.join(problems)}; resuming from step {step} instead")
    return state
  if not problems:
    raise ValueError(f"resume={state_dir!r} holds no completed state checkpoint")
  raise ValueError(f"resume={state_dir!r} holds no usable state: " + "; ".join(problems))


def _restore_checked(
  path: str, step: int, mesh: jax.sharding.Mesh, latent_shape, digest: str | None = None
) -> sampling.SamplerState:
  import orbax.checkpoint as ocp

  try:
    with open(os.path.join(path, STATE_CHECKSUMS), encoding="utf-8") as f:
      record = json.load(f)
    sums, made_with = record["arrays"], record.get("fingerprint")
  except FileNotFoundError:
    raise ValueError(f"no {STATE_CHECKSUMS} (the save did not complete)") from None
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
    raise ValueError(f"{STATE_CHECKSUMS} cannot be read (truncated or damaged?): {video_io.one_line(err)}") from None
  if digest is not None and made_with is not None and made_with != digest:
    raise ValueError(
      f"its arrays were made under other settings than the ones {STATE_META} records and this run has "
      f"({STATE_META} copied from another run?)"
    )
  frames = jax.sharding.NamedSharding(mesh, parallel.frames_spec())
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = {
    "x": jax.ShapeDtypeStruct(latent_shape, jnp.float32, sharding=frames),
    "x0": jax.ShapeDtypeStruct(latent_shape, jnp.float32, sharding=frames),
    "i": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
  }
  try:
    with quiet_orbax():
      d = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
  except Exception as err:  # orbax / tensorstore raise many kinds for damaged files
    reason = video_io.one_line(err).split(". See full TensorStore details")[0]  # not its whole spec
    raise ValueError(f"the checkpoint cannot be read (truncated or damaged?): {reason}") from None
  got = checksums(d)
  bad = [k for k in target if not isinstance(sums.get(k), dict) or sums[k].get("sha256") != got[k]["sha256"]]
  if bad:
    raise ValueError(f"the checksum of {', '.join(repr(k) for k in bad)} does not match: the files are damaged")
  if int(np.asarray(d["i"])) != step:
    raise ValueError(f"it holds step {int(np.asarray(d['i']))}")
  return sampling.SamplerState(x=d["x"], x0=d["x0"], i=d["i"])


@contextlib.contextmanager
def quiet_orbax():
  """Keep orbax's and TensorStore's own reports of a failed save or read out of the terminal; the error raised
  says it in one line. They are: absl ERROR logs with a traceback from orbax's threads (three per failed save),
  and "Exception ignored" tracebacks of the reads a failed restore leaves behind, each with TensorStore's
  multi-line spec (and "Event loop is closed" from reads that end after orbax's event loop)."""
  import gc
  import logging
  import sys
  import time

  _filter_orbax_futures()  # first: the hook kept below is then the filtering one
  absl = logging.getLogger("absl")
  level, hook = absl.level, sys.unraisablehook

  def drop_orbax_leftovers(u) -> None:
    code = getattr(u.object, "cr_code", None)
    orbax = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    closed = u.object is None and isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
    if not (orbax or closed):
      hook(u)

  absl.setLevel(logging.CRITICAL)
  sys.unraisablehook = drop_orbax_leftovers
  failed = True
  try:
    yield
    failed = False
  finally:
    if failed:
      time.sleep(0.2)  # the reads still running end now, and
      gc.collect()  # their coroutines go now, while their reports are dropped
    absl.setLevel(level)
    sys.unraisablehook = hook


def _from_orbax(tb) -> bool:
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _orbax_future(record) -> bool:
  """False for asyncio's "Future exception was never retrieved" report of an orbax write (logged with its
  traceback when the future is collected, which may be after :func:`quiet_orbax` ends); True for the rest."""
  exc = record.exc_info[1] if record.exc_info else None
  seen = set()
  while exc is not None and id(exc) not in seen:  # the OSError's own traceback, or the one it caused
    seen.add(id(exc))
    if _from_orbax(exc.__traceback__):
      return False
    exc = exc.__context__ or exc.__cause__
  return True


def _filter_orbax_futures() -> None:
  """Install :func:`_orbax_future` on the asyncio logger, and a ``sys.unraisablehook`` that drops the
  "Exception ignored in <coroutine ...orbax...>" reports of reads a failed restore left behind, once: both
  may come after :func:`quiet_orbax` ended (when the garbage is collected, or at exit); each drops only
  orbax's own reports."""
  import logging
  import sys

  log = logging.getLogger("asyncio")
  if _orbax_future not in log.filters:
    log.addFilter(_orbax_future)
  if not getattr(sys.unraisablehook, "_vinf_jax", False):
    hook = sys.unraisablehook

    def drop_orbax_coroutines(u) -> None:
      code = getattr(u.object, "cr_code", None)
      if not (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename):
        hook(u)

    drop_orbax_coroutines._vinf_jax = True
    sys.unraisablehook = drop_orbax_coroutines


def _os_reason(err: BaseException) -> str:
  """:func:`video_io.one_line` of ``err``, or the OS's words when TensorStore names its error code (a full disk:
  "No space left on device" rather than 300 characters of OCDBT paths)."""
  import re

  code = re.search(r"\[os_error_code='?(\d+)'?\]", str(err))
  return os.strerror(int(code.group(1))) if code else video_io.one_line(err)
