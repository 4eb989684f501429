"""The memory plan: the bytes a run needs on each device, known before anything loads or compiles.

Per device a run holds the UNet and VAE weights (in the run's dtype; the text encoder lives on the host),
the sampler state (``x``, ``x0``: float32 latents of the local frames) and the text contexts, and then at
its peak either the guided step's temporaries or the decoder's (its temporaries and the decoded frames).
The weights and the state are exact (shapes times itemsizes). The temporaries come from XLA's own plan of
the compiled programs (``compiled.memory_analysis().temp_size_in_bytes``), measured once per model,
dtype and step kind by ``python -m benchmarks.memory_table`` and kept in ``memory_table.json`` beside this
file as linear models of the local frames F, the effective ``frame_chunk`` C (F when 0 or >= F) and the
``decode_chunk`` K::

    step temporaries, unchunked (C = F)  = fixed + per_frame * F
    step temporaries, chunked (C < F)    = max(fixed + per_frame * F + per_chunk_frame * C,    per-frame layers
                                               fixed' + per_frame' * F)                         temporal layers
    decode temporaries and output        = fixed + per_frame * F + per_chunk_frame * K

(the chunked step is another program: the per-frame layers mapped over chunks, while the temporal layers still
hold the whole clip, so below some chunk a smaller one saves nothing) at the table's latent size,
scaled by latent pixels for other sizes (activations are per pixel). With the plan, ``auto`` chunks are the
largest that fit the device's memory with a margin, and a run that cannot fit even with the smallest chunks
is refused before its weights load (:func:`check_fits`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import numpy as np

from vinf_jax.config import ModelConfig

GiB = 2**30
AUTO = "auto"
# Of the memory a device has, what a plan may use: XLA's plan is not the whole story (cuDNN and cuBLAS
# workspaces, the allocator's fragmentation, the runtime's own buffers).
MARGIN = 0.9
FRAME_CHUNKS = (0, 64, 32, 16, 8, 4, 2, 1)  # 0: every local frame at once (fastest); then smaller chunks
DECODE_CHUNKS = (8, 4, 2, 1)
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_table.json")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """What one device holds, in bytes (see the module docstring); ``limit``: what the device offers."""

  frames_per_device: int
  frame_chunk: int
  decode_chunk: int
  weights: int
  state: int
  step_temp: int
  decode_temp: int
  limit: int | None
  limit_source: str
  table: str

  @property
  def step_peak(self) -> int:
    return self.weights + self.state + self.step_temp

  @property
  def decode_peak(self) -> int:
    return self.weights + self.state + self.decode_temp

  @property
  def peak(self) -> int:
    return max(self.step_peak, self.decode_peak)

  def fits(self) -> bool:
    return self.limit is None or self.peak <= MARGIN * self.limit

  def describe(self) -> str:
    """One line for the log: the chunks, the parts and the peak against the limit."""
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lim = f" of {g(self.limit)} GiB ({self.limit_source})" if self.limit is not None else ""
    return (
      f"memory plan per device: {self.frames_per_device} frames, frame_chunk {self.frame_chunk}, decode_chunk "
      f"{self.decode_chunk}: weights {g(self.weights)} + state {g(self.state)} + step {g(self.step_temp)} | "
      f"decode {g(self.decode_temp)} GiB -> peak {g(self.peak)} GiB{lim}"
    )

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(step_peak=self.step_peak, decode_peak=self.decode_peak, peak=self.peak, margin=MARGIN)
    return d


@functools.cache
def load_table(path: str = TABLE_PATH) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _entry(model: ModelConfig, dtype: str, guided: bool) -> tuple[dict, float]:
  """The table's entry for this model, dtype and step kind, and the factor that scales it to ``dtype``.

  Models the table lacks use the entry of the family they were built from (a T2V-Turbo UNet is VideoCrafter2's
  plus two small projections); a dtype it lacks scales from bfloat16 by the itemsize.
  """
  table = load_table()["entries"]
  base = model.name.split("_turbo")[0] if model.name not in table else model.name
  base = base if base in table else ("tiny" if model.unet.model_channels < 320 else "videocrafter2")
  kind = "guided" if guided else "turbo"
  by_dtype = table[base]
  if dtype in by_dtype:
    return by_dtype[dtype].get(kind, by_dtype[dtype]["guided"]), 1.0
  ref = by_dtype.get("bfloat16") or next(iter(by_dtype.values()))
  scale = np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize / 2
  return ref.get(kind, ref["guided"]), scale  # no turbo entry: the guided one (batch 2) over-estimates


@functools.cache
def weight_bytes(model: ModelConfig) -> int:
  """Bytes of the UNet and VAE weights per device in the model's dtypes (abstract models: no allocation)."""
  from flax import nnx

  from vinf_jax.models import unet3d, vae

  total = 0
  for m in (unet3d.abstract(model.unet), vae.abstract(model.vae)):
    total += sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in jax.tree.leaves(nnx.state(m)))
  return total


def plan_memory(
  model: ModelConfig,
  *,
  frames: int,
  num_devices: int,
  height: int,
  width: int,
  guided: bool,
  frame_chunk: int,
  decode_chunk: int,
  prompts: int = 1,
  limit: int | None = None,
  limit_source: str = "",
) -> MemoryPlan:
  """The plan of one run with explicit chunks (``model`` in the run's dtype)."""
  f_loc = frames // num_devices
  down = model.vae.downsample_factor
  h, w = height // down, width // down
  entry, scale = _entry(model, model.unet.dtype, guided)
  pix = h * w / (entry["latent_hw"][0] * entry["latent_hw"][1])
  c_eff = f_loc if frame_chunk <= 0 or frame_chunk >= f_loc else frame_chunk
  k_eff = min(decode_chunk, f_loc)
  dc = entry["decode"]
  if 0 < frame_chunk < f_loc:
    lines = entry["step_chunked"]["chunk_line"], entry["step_chunked"]["temporal_line"]
  else:
    lines = (entry["step_unchunked"],)
  step = max(_line(ln, pix, f_loc, c_eff) for ln in lines) * scale
  decode = (dc["fixed"] + pix * (dc["per_frame"] * f_loc + dc["per_chunk_frame"] * k_eff)) * scale
  latent = f_loc * h * w * model.unet.in_channels * 4  # float32
  ctx = model.unet.context_dim * model.text.context_length * 4 * (2 * f_loc if prompts > 1 else 2)
  return MemoryPlan(
    frames_per_device=f_loc,
    frame_chunk=frame_chunk,
    decode_chunk=decode_chunk,
    weights=weight_bytes(model),
    state=2 * latent + ctx,
    step_temp=max(0, int(step)),
    decode_temp=max(0, int(decode)),
    limit=limit,
    limit_source=limit_source,
    table=f"{entry.get('source', '?')}",
  )


def _line(c: dict, pix: float, frames: int, chunk: int) -> float:
  return c["fixed"] + pix * (c["per_frame"] * frames + c.get("per_chunk_frame", 0.0) * chunk)


def device_limit(user_gib: float = 0.0) -> tuple[int | None, str]:
  """Bytes a device offers a run and where the figure comes from: ``--device_memory_gib`` when given (and
  below the device's own), else the accelerator's free bytes (its allocator's limit less what is in use),
  else on CPU the host's available memory shared by its devices."""
  dev = jax.local_devices()[0]
  own, source = None, ""
  try:
    stats = dev.memory_stats()
  except Exception:  # noqa: BLE001 -- backends without memory statistics
    stats = None
  if stats and stats.get("bytes_limit"):
    own, source = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"free on {dev.device_kind}"
  elif dev.platform == "cpu":
    try:
      avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # not what is free now: the same plan each run
      own, source = avail // max(1, jax.local_device_count()), "host memory per CPU device"
    except (ValueError, OSError, AttributeError):
      own = None
  if user_gib and (own is None or user_gib * GiB < own):
    return int(user_gib * GiB), f"device_memory_gib={user_gib:g}"
  return own, source


def choose(
  model: ModelConfig,
  *,
  frame_chunk: int | str,
  decode_chunk: int | str,
  limit: int | None = None,
  source: str = "",
  **inputs,
) -> MemoryPlan:
  """The plan with ``auto`` chunks resolved: the largest that fit ``limit`` (explicit values win); when
  nothing fits, the plan of the smallest chunks (``fits()`` False; :func:`check_fits` says what would).
  ``inputs``: frames, num_devices, height, width, guided, prompts as for :func:`plan_memory`."""
  f_loc = max(1, inputs["frames"] // inputs["num_devices"])
  fcs = [frame_chunk] if frame_chunk != AUTO else [c for c in FRAME_CHUNKS if c < f_loc] or [0]
  dcs = [decode_chunk] if decode_chunk != AUTO else [c for c in DECODE_CHUNKS if c <= f_loc] or [1]
  best = None
  for fc in fcs:
    for dc in dcs:
      best = plan_memory(model, frame_chunk=fc, decode_chunk=dc, limit=limit, limit_source=source, **inputs)
      if best.fits():
        return best
  return best


def check_fits(p: MemoryPlan, model: ModelConfig, *, frames: int, num_devices: int, **inputs) -> str | None:
  """None when ``p`` fits; else the refusal: the frames per device that fit with the smallest chunks on
  this device, and the device count that would hold the request. ``inputs``: height, width, guided, prompts."""
  if p.fits():
    return None
  one = lambda n: plan_memory(model, frames=n, num_devices=1, frame_chunk=1, decode_chunk=1, **inputs).peak  # noqa: E731
  per_frame = max(1, one(1025) - one(1024))  # chunked (chunk 1 < frames): linear in the frames
  base = one(1024) - 1024 * per_frame
  budget = MARGIN * p.limit
  fit = max(0, int((budget - base) // per_frame)) if budget >= one(1) else 0
  need = math.ceil(frames / fit) if fit else None
  g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
  devices = (
    f"{need} devices like it would hold the {frames} frames"
    if need
    else "not even one frame fits: use a device with more memory (or dtype=bfloat16 / float16)"
  )
  return (
    f"frames={frames} over {num_devices} device(s) need {g(p.peak)} per device by the memory plan "
    f"({p.frames_per_device} frames each, frame_chunk {p.frame_chunk}, decode_chunk {p.decode_chunk}), more than "
    f"{MARGIN:.0%} of the {g(p.limit)} a device offers ({p.limit_source}); with the smallest chunks a device "
    f"holds at most {fit} frames: {devices}"
  )
