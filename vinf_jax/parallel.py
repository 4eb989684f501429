"""Clip parallelism: the frame context that temporal layers see, and every collective of the project.

The video latent ``[B, N, H, W, C]`` is split along frames over a 1-D mesh axis ``frames``: device r
holds frames ``[r*T, (r+1)*T)`` with ``T = N / D``. Spatial layers run locally. The temporal layers
(temporal conv blocks, temporal attentions, the GroupNorms that span frames) reach frames they do
not hold only through a :class:`FrameContext`:

* ``halo(x, n)``: the ``n`` frames before and after the local clip (``ppermute`` from the
  neighbours, zeros beyond the video's ends);
* ``sum_frames(x)``: a sum over the whole video (``psum``) for GroupNorm statistics;
* ``gather_frames(x, positions)``: frames at fixed video positions (``all_gather``);
* ``all_frames(x)``: the whole video (``all_gather``), for the 'full' attention mode.

With ``axis_name=None`` (the default) the context is the identity on one device holding the whole
clip, and the UNet is plain VideoCrafter2.

Communication per guided step (batch 2: both CFG branches in one UNet call), full-size UNet at
320x512 (latent 40x64), bfloat16, dual-scope P=8, G=16; bytes each interior device sends (arithmetic
from the block table of the architecture notes; to be checked against a GPU trace):

* temporal conv halos: 22 blocks x 2 directions x 4 frames; the blocks hold 7,526,400 values per frame
  in all (5 at 40x64x320, 5 at 20x32x640, 5 at 10x16x1280, 7 at 5x8x1280), so
  7,526,400 x 4 x 2 x 2 (batch) x 2 B = 241 MB;
* attention K/V halos: 34 attentions x K and V x 2 directions x P=8 frames; the 17 temporal
  transformers hold 8,529,920 values per frame (init_attn 40x64x512, then 5/5/5/1 per level), so
  8,529,920 x 2 (attn1, attn2) x 2 (K, V) x 8 x 2 x 2 (batch) x 2 B = 2.18 GB;
* global frames: every device receives the G=16 frames' K and V of all 34 attentions, the same
  2.18 GB (each device sends its G/D share of it);
* GroupNorm statistics: two psums of [2, 32] float32 for each of the 105 frame-spanning norms (88
  temporal-conv stages, 17 temporal transformers): ~55 kB.

So about 2.4 GB out and 2.4 GB + 2.2 GB in per device per step, independent of the frames a device
holds: at 64 frames per device (about 200 ms of compute per step on an H100) it is a few percent of
the step on NVLink, and less at more frames per device.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from vinf_jax.config import TemporalConfig

FRAMES = "frames"


@dataclasses.dataclass(frozen=True)
class FrameContext:
  """Static description of how the local clip sits in the video; hashable, so it can be a jit static.

  Attributes:
    temporal: the temporal options (attention mode, window, global frames, GroupNorm statistics).
    axis_name: the mesh axis the frames are split over, or None for one device holding the video.
    num_shards: devices along ``axis_name`` (1 when ``axis_name`` is None).
  """

  temporal: TemporalConfig = TemporalConfig()
  axis_name: str | None = None
  num_shards: int = 1

  @property
  def exact_norm(self) -> bool:
    return self.temporal.group_norm == "global"

  def total_frames(self, local_frames: int) -> int:
    return local_frames * self.num_shards

  def frame_offset(self, local_frames: int) -> jax.Array | int:
    """Video index of the first local frame."""
    if self.axis_name is None:
      return 0
    return jax.lax.axis_index(self.axis_name) * local_frames

  def halo(self, x: jax.Array, n: int, axis: int = 1) -> tuple[jax.Array, jax.Array]:
    """(left, right): the n frames before and after the local clip along ``axis``; zeros past the ends."""
    t = x.shape[axis]
    if n == 0:
      empty = jax.lax.slice_in_dim(x, 0, 0, axis=axis)
      return empty, empty
    if self.axis_name is None or self.num_shards == 1:
      z = jnp.zeros(x.shape[:axis] + (n,) + x.shape[axis + 1 :], x.dtype)
      return z, z
    if n > t:
      raise ValueError(f"a halo of {n} frames needs at least {n} frames per device, got {t}")
    d = self.num_shards
    tail = jax.lax.slice_in_dim(x, t - n, t, axis=axis)
    head = jax.lax.slice_in_dim(x, 0, n, axis=axis)
    # ppermute leaves zeros on the devices that receive nothing: the video's two ends.
    left = jax.lax.ppermute(tail, self.axis_name, [(i, i + 1) for i in range(d - 1)])
    right = jax.lax.ppermute(head, self.axis_name, [(i + 1, i) for i in range(d - 1)])
    return left, right

  def sum_frames(self, x: jax.Array) -> jax.Array:
    """Sum of per-device partial sums over the whole video (exact GroupNorm statistics)."""
    if self.axis_name is None or not self.exact_norm:
      return x
    return jax.lax.psum(x, self.axis_name)

  def all_frames(self, x: jax.Array, axis: int) -> jax.Array:
    """The whole video along ``axis`` (device order = frame order)."""
    if self.axis_name is None:
      return x
    return jax.lax.all_gather(x, self.axis_name, axis=axis, tiled=True)

  def global_positions(self, num_frames: int) -> tuple[int, ...]:
    """Video indices of the dual-scope attention's global frames (:func:`global_positions`)."""
    return global_positions(num_frames, self.temporal.num_global, self.num_shards, self.temporal.global_frames)

  def gather_frames(self, x: jax.Array, positions: tuple[int, ...], axis: int) -> jax.Array:
    """Frames at the given (static, sorted) video positions, identical on every device."""
    t = x.shape[axis]
    if self.axis_name is None:
      return jnp.take(x, np.asarray(positions), axis=axis)
    # Each device sends the same number c of candidate frames (static shapes); which of the
    # gathered (device, slot) pairs are real is known statically, so the selection is static too.
    plan = _gather_plan(positions, t, self.num_shards)
    # local indices of this device's candidates, from a per-device table (index 0 where unused)
    idx = jnp.asarray(plan.local_index)[jax.lax.axis_index(self.axis_name)]  # [c]
    mine = jnp.take(x, idx, axis=axis)  # c frames
    everyone = jax.lax.all_gather(mine, self.axis_name, axis=axis, tiled=True)  # D*c frames
    return jnp.take(everyone, np.asarray(plan.select), axis=axis)


@dataclasses.dataclass(frozen=True)
class _GatherPlan:
  per_device: int
  local_index: np.ndarray  # [D, c] local frame index each device sends
  select: np.ndarray  # [len(positions)] flat index into the gathered D*c frames


def _gather_plan(positions: tuple[int, ...], t: int, d: int) -> _GatherPlan:
  owned = [[p - r * t for p in positions if r * t <= p < (r + 1) * t] for r in range(d)]
  c = max(1, max(len(o) for o in owned))
  local_index = np.zeros((d, c), np.int32)
  select = []
  for r, o in enumerate(owned):
    local_index[r, : len(o)] = o
    select += [r * c + j for j in range(len(o))]
  return _GatherPlan(c, local_index, np.asarray(select, np.int32))


def global_positions(num_frames: int, num_global: int, num_devices: int = 1, rule: str = "video") -> tuple[int, ...]:
  """Video indices of the dual-scope attention's global frames, sorted.

  ``rule='video'``: the fixed indices k * N / G (G must divide N), whatever the device count.
  ``rule='official'``: as the official code, on ``num_devices`` devices of T = N / D frames: each device
  takes its local frames ``0, s, 2s, ... < T`` with ``s = max(T // (G // D), 1)`` (only local frame 0
  when ``G // D == 0``), gathered in device order, and the first G of them are kept (fewer when there are
  fewer: G=16 on 5 devices of 24 frames gives 15).
  """
  if rule == "official":
    if num_frames % num_devices:
      raise ValueError(f"{num_frames} frames are not divisible by the {num_devices} devices")
    t, share = num_frames // num_devices, num_global // num_devices
    local = range(0, t, max(t // share, 1)) if share > 0 else range(1)
    return tuple(r * t + i for r in range(num_devices) for i in local)[:num_global]
  if rule != "video":
    raise ValueError(f"global frame rule {rule!r}, expected 'video' or 'official'")
  if num_frames % num_global:
    raise ValueError(f"{num_frames} frames are not divisible by num_global={num_global}")
  stride = num_frames // num_global
  return tuple(range(0, num_frames, stride))


def check_frames(num_frames: int, num_devices: int, temporal: TemporalConfig) -> None:
  """Raise before compiling when a frame count cannot work with this device count and temporal config."""
  e = []
  if num_frames < 1:
    e.append(f"frames={num_frames}, expected >= 1")
  elif num_frames % num_devices:
    e.append(f"frames={num_frames} is not divisible by the {num_devices} devices of the 'frames' axis")
  else:
    t = num_frames // num_devices
    if num_devices > 1 and t < 4:
      e.append(
        f"frames per device={t} (frames={num_frames} over {num_devices} devices): the temporal conv "
        "blocks need a 4-frame halo, so at least 4 frames per device"
      )
    if temporal.attention == "dual":
      if num_devices > 1 and temporal.window > t:
        e.append(
          f"window P={temporal.window} is larger than the {t} frames each device holds "
          f"(frames={num_frames} over {num_devices} devices)"
        )
      if num_frames % temporal.num_global and temporal.global_frames == "video":
        e.append(
          f"frames={num_frames} is not divisible by num_global G={temporal.num_global} (global_frames=video; "
          "global_frames=official takes each device's evenly spaced frames instead)"
        )
  if e:
    raise ValueError("frames do not fit the parallel scheme:\n  - " + "\n  - ".join(e))


def lcm_frames(num_devices: int, temporal: TemporalConfig) -> int:
  """Smallest frame-count step that every check above accepts (for error messages)."""
  step = num_devices
  if temporal.attention == "dual" and temporal.global_frames == "video":
    step = step * temporal.num_global // math.gcd(step, temporal.num_global)
  return step


# ------------------------------------------------------------------------------------------------
# Mesh, shardings and the one-program denoising step.


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D ``frames`` mesh: every device of every process by default, or the first K local devices."""
  if num_devices is None:
    devices = jax.devices()
  else:
    local = jax.local_devices()
    if not 1 <= num_devices <= len(local):
      raise ValueError(f"num_devices={num_devices}, but this process has {len(local)} local devices")
    devices = local[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), (FRAMES,))


def frames_spec() -> jax.sharding.PartitionSpec:
  """Latents [B, N, H, W, C] (and per-frame contexts [B, N, S, C]) are split along N."""
  return jax.sharding.PartitionSpec(None, FRAMES)


def compiler_options(num_devices: int = 1) -> dict | None:
  """XLA options for compiling the step and the decoder on this backend (``Lowered.compile``).

  On GPU, GEMMs go to cuBLAS instead of Triton: the same step time (full UNet, 64 frames, H100: 280.2 ms
  against 281.8 ms) for a quarter less compile time (21.9 s against 29.0 s), as benchmarks/RESULTS.md
  records. On a mesh of several GPUs, XLA's latency-hiding scheduler may also move the halo ``ppermute``s
  and the global frames' ``all_gather`` away from their consumers, so they overlap the spatial layers'
  compute (not yet measured: no multi-GPU machine was lent since it was turned on).
  """
  if jax.default_backend() != "gpu":
    return None
  opts = {"xla_gpu_enable_triton_gemm": False}
  if num_devices > 1:
    opts["xla_gpu_enable_latency_hiding_scheduler"] = True
  return opts


def frame_context(mesh: jax.sharding.Mesh, temporal: TemporalConfig) -> FrameContext:
  d = mesh.shape[FRAMES]
  # One device needs no collectives: the same math, and the fast paths of the temporal layers.
  return FrameContext(temporal, FRAMES, d) if d > 1 else FrameContext(temporal)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """The jitted programs of one sampling run on a mesh (see :func:`make_denoiser`).

  Attributes:
    init: ``(seed) -> SamplerState``: x_T drawn per global frame on the devices that hold it.
    step: ``(params, state, ctx_cond, ctx_uncond, fps, seed) -> SamplerState``: both guidance
      branches of the UNet (one conditional call with the embedded guidance for an unguided plan, T2V-Turbo's)
      and the sampler update for every frame, one XLA program; ``state`` is donated, so the latents stay
      where they are.
    params: the UNet's state, replicated over the mesh.
    num_steps: steps of the plan.
  """

  init: object
  step: object
  params: object
  num_steps: int


def make_denoiser(
  model,
  plan,
  temporal: TemporalConfig,
  mesh: jax.sharding.Mesh,
  *,
  latent_shape: tuple[int, int, int, int, int],
  context_per_frame: bool = False,
  frame_chunk: int = 0,
) -> Denoiser:
  """Build the clip-parallel sampling programs for ``model`` (a UNet3D) on ``mesh``.

  Args:
    model: the UNet (weights are replicated onto the mesh here).
    plan: a :class:`vinf_jax.sampling.SamplerPlan`.
    temporal: the temporal options (validated with the frame count before anything compiles).
    mesh: a 1-D mesh over ``frames`` (:func:`make_mesh`).
    latent_shape: ``(B, N, h, w, c)`` of the whole video's latent.
    context_per_frame: contexts are ``[B, N, S, C]`` (one text per frame, split with the frames)
      instead of ``[B, S, C]`` (replicated).
    frame_chunk: the UNet's ``frame_chunk`` (local frames per chunk of its per-frame layers; 0: no
      chunking): bounds the activation memory so a device can hold more frames, at some speed.
  """
  from flax import nnx

  from vinf_jax import sampling

  _check_denoiser(model, plan, frame_chunk)
  b, n, h, w, c = latent_shape
  d = mesh.shape[FRAMES]
  temporal.validate()
  check_frames(n, d, temporal)
  t_loc = n // d
  frames = frame_context(mesh, temporal)
  graphdef, params = nnx.split(model)
  params = jax.tree.map(lambda a: on_mesh(a, mesh), params)  # no copy when already replicated there
  P = jax.sharding.PartitionSpec
  state_spec = sampling.SamplerState(x=frames_spec(), x0=frames_spec(), i=P())
  ctx_spec = frames_spec() if context_per_frame else P()

  def frame_index():
    r = jax.lax.axis_index(FRAMES) if d > 1 else 0
    return r * t_loc + jnp.arange(t_loc, dtype=jnp.int32)  # global video index of the local frames

  def init_body(seed):
    x = sampling.batch_initial_noise(seed, frame_index(), (h, w, c), b)  # x: [B, T, h, w, c]
    return sampling.init(plan, x)

  def step_body(params, state, ctx_c, ctx_u, fps, seed):
    # state.x: [B, T, h, w, c] local frames; ctx: [B, S, C] or [B, T, S, C]; fps: [B]
    unet = nnx.merge(graphdef, params)
    t = sampling.timestep(plan, state.i)
    noise = None
    if plan.stochastic:
      noise = sampling.batch_frame_noise(seed, state.i, frame_index(), (h, w, c), b)
    if not plan.guided:
      # T2V-Turbo: one UNet call on the conditional branch, the guidance scale (and v2's motion scale of
      # this step) embedded into the UNet; ctx_u is not used.
      cond = {"guidance": jnp.asarray(plan.guidance)}
      if model.cfg.motion_cond:
        cond["motion"] = jnp.asarray(plan.motion)[state.i]
      eps = unet(state.x, t, ctx_c, fps, **cond, frames=frames, frame_chunk=frame_chunk)
      return sampling.step(plan, state, None, eps, noise)
    x2 = jnp.concatenate([state.x, state.x], axis=0)  # [2B, T, ...]: (uncond, cond)
    ctx2, fps2 = jnp.concatenate([ctx_u, ctx_c], axis=0), jnp.concatenate([fps, fps])
    eps = unet(x2, t, ctx2, fps2, frames=frames, frame_chunk=frame_chunk)
    return sampling.step(plan, state, eps[:b], eps[b:], noise)

  init, step = _jit_programs(init_body, step_body, mesh, state_spec, ctx_spec)
  return Denoiser(init=init, step=step, params=params, num_steps=sampling.num_steps(plan))


def _check_denoiser(model, plan, frame_chunk) -> None:
  """Raise for a ``frame_chunk`` that is no int >= 0, or a sampler the UNet cannot run (:func:`make_denoiser`)."""
  if isinstance(frame_chunk, bool) or not isinstance(frame_chunk, int) or frame_chunk < 0:
    raise ValueError(f"frame_chunk={frame_chunk!r}, expected an int >= 0 (0: no chunking)")
  if plan.guided == bool(model.cfg.time_cond_proj_dim):
    need = "without a guidance embedding (for CFG)" if plan.guided else "with time_cond_proj (T2V-Turbo)"
    raise ValueError(f"the {plan.name!r} sampler needs a UNet {need}")


def _jit_programs(init_body, step_body, mesh, state_spec, ctx_spec):
  """``(init, step)``: the per-device bodies of :func:`make_denoiser` as jitted ``shard_map`` programs on
  ``mesh``; the step donates its sampler state (argument 1)."""
  P = jax.sharding.PartitionSpec
  init = jax.jit(jax.shard_map(init_body, mesh=mesh, in_specs=P(), out_specs=state_spec, check_vma=False))
  step = jax.jit(
    jax.shard_map(
      step_body,
      mesh=mesh,
      in_specs=(P(), state_spec, ctx_spec, ctx_spec, P(), P()),
      out_specs=state_spec,
      check_vma=False,
    ),
    donate_argnums=(1,),
  )
  return init, step


def gather_to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) global array as one numpy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def replicate(x, mesh: jax.sharding.Mesh) -> jax.Array:
  """A host value (the same on every process) as an array replicated over the mesh."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx])


def on_mesh(x, mesh: jax.sharding.Mesh) -> jax.Array:
  """``x`` replicated over ``mesh``: as it is when it already is (no copy), else through the host; an abstract
  ``jax.ShapeDtypeStruct`` (compile-only memory plans) gets the replicated sharding."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
  if isinstance(x, jax.Array) and x.sharding.is_fully_replicated and x.sharding.device_set == set(mesh.devices.flat):
    return x
  return replicate(np.asarray(x), mesh)
