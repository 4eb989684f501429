"""The compiled programs of a run (the guided step, the decoder), kept for the next video of the same shape.

Compiling the step of the full-size model takes a minute; a notebook trying prompts and seeds, the web page
and the tests make many videos of one shape. :class:`Programs` (held by :class:`.models.Models`) keeps one
step and one decode program, each with the key of what it depends on: a new key replaces it, so old
programs and their weight copies do not pile up. Also here: the persistent compilation cache.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from vinf_jax import parallel
from vinf_jax.pipeline.settings import GenerationConfig, latent_shape, plan_memory

if TYPE_CHECKING:
  from vinf_jax.pipeline.models import Models


@dataclasses.dataclass(eq=False)
class Programs:
  """The last step and decode programs, each with its key (:func:`step_key`, :func:`decode_key`).

  Attributes:
    step_key: what ``denoiser`` and ``step`` were made for (None: nothing kept).
    denoiser: :func:`vinf_jax.parallel.make_denoiser`'s result for ``step_key``.
    step: its compiled step, or None until compiled.
    decode_key: what ``decode`` was compiled for.
    decode: ``(vae params on the mesh, compiled decode)``.
  """

  step_key: tuple | None = None
  denoiser: object | None = None
  step: Callable | None = None
  decode_key: tuple | None = None
  decode: tuple | None = None

  def clear(self) -> None:
    """Forget every program (the next video compiles afresh)."""
    self.step_key = self.denoiser = self.step = self.decode_key = self.decode = None

  def kept(self) -> dict:
    """The keys of the programs kept now, by name (what a comparison before and after a request needs)."""
    return {"step": self.step_key if self.step is not None else None, "decode": self.decode_key}

  def denoiser_for(self, key: tuple, make: Callable[[], object]):
    """The denoiser of ``key``, made (and its step left to compile) when the key is new."""
    if self.step_key != key:
      self.denoiser = self.step = None  # the old one's weight copies go before the new ones are made
      self.denoiser, self.step_key = make(), key
    return self.denoiser

  def decoder_for(self, key: tuple, make: Callable[[], tuple]) -> tuple:
    """``(vae params, compiled decode)`` of ``key``, compiled when the key is new."""
    if self.decode_key != key:
      self.decode = None
      self.decode, self.decode_key = make(), key
    return self.decode


def step_key(cfg: GenerationConfig, mesh: jax.sharding.Mesh, latent_shape, per_frame: bool, frame_chunk: int) -> tuple:
  """What the compiled guided step depends on (``generate`` keeps one step program per key); ``frame_chunk``:
  the value the run uses (``auto`` resolved by the memory plan)."""
  return (cfg.sampler_config(), cfg.temporal_config(), tuple(mesh.devices.flat), latent_shape, per_frame, frame_chunk)


def decode_key(mesh: jax.sharding.Mesh, latent_shape, chunk: int) -> tuple:
  return (tuple(mesh.devices.flat), latent_shape, chunk, piece_frames(latent_shape[1] // mesh.size, chunk))


PIECES = 16  # the decode hands the writer about this many pieces: the writer waits ~1/16 of the decode


def piece_frames(local_frames: int, chunk: int) -> int:
  """Frames per device in one piece of the decode (:func:`make_decoder`): a multiple of ``chunk`` giving
  about :data:`PIECES` pieces, at most ``local_frames``."""
  chunk = max(1, min(chunk, local_frames))
  return min(local_frames, chunk * max(1, round(local_frames / (PIECES * chunk))))


def piece_starts(local_frames: int, piece: int) -> list[int]:
  """Where each piece starts in a device's frames: every ``piece`` frames, the last one ending at the last
  frame (it overlaps the one before when ``piece`` does not divide the frames; those frames are kept once)."""
  starts = list(range(0, local_frames - piece + 1, piece))
  if starts[-1] + piece < local_frames:
    starts.append(local_frames - piece)
  return starts


def will_compile(cfg: GenerationConfig, models: Models) -> tuple[str, ...]:
  """The programs ``generate(cfg, models=models)`` would compile now: ``'step'`` and/or ``'decode'``.

  Empty when the programs kept on ``models`` from the last video fit these settings (same shapes, sampler,
  temporal options and devices; prompts, seed and the outputs do not matter). ``cfg`` must be valid.
  """
  mesh = parallel.make_mesh(cfg.num_devices or None)
  shape = latent_shape(cfg, models.config)
  mem = plan_memory(cfg, models.config, mesh.size)
  kept = models.programs
  step = kept.step_key != step_key(cfg, mesh, shape, len(cfg.prompts) > 1, mem.frame_chunk) or kept.step is None
  decode = kept.decode_key != decode_key(mesh, shape, mem.decode_chunk)
  return (("step",) if step else ()) + (("decode",) if decode else ())


def make_decoder(vae_model, mesh: jax.sharding.Mesh, chunk: int, piece: int | None = None):
  """``(params, decode)``: ``decode(params, latents [B, N, h, w, c] split over frames, start)`` -> uint8 frames
  ``[B, D * piece, H, W, 3]``, the ``piece`` frames from ``start`` (an int32 scalar) of each device's share,
  decoded where they lie ``chunk`` frames at a time; ``piece`` None: all of them (``start`` is then 0)."""
  from flax import nnx

  from vinf_jax.models import vae as vae_lib

  graphdef, params = nnx.split(vae_model)
  params = jax.tree.map(lambda a: parallel.on_mesh(a, mesh), params)
  P = jax.sharding.PartitionSpec

  def body(params, z, start):  # z: [B, T, h, w, c] local frames
    if piece is not None and piece < z.shape[1]:
      z = jax.lax.dynamic_slice_in_dim(z, start, piece, axis=1)
    x = vae_lib.decode_in_chunks(nnx.merge(graphdef, params), z, chunk)  # [B, piece, H, W, 3] float32
    return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)  # as video_io.to_uint8

  specs = (P(), parallel.frames_spec(), P())
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=parallel.frames_spec()))
  return params, fn


def decoder(models: Models, mesh: jax.sharding.Mesh, latent_shape, chunk: int, x: jax.Array) -> tuple:
  """(vae_params, compiled decode of one piece, piece) for latents like ``x``, compiled once per (mesh, shape,
  chunk); the piece is :func:`piece_frames`."""
  piece = piece_frames(latent_shape[1] // mesh.size, chunk)

  def make():
    vae_params, decode = make_decoder(models.vae, mesh, chunk, piece)
    start = parallel.replicate(np.int32(0), mesh)
    return vae_params, decode.lower(vae_params, x, start).compile(parallel.compiler_options(mesh.size)), piece

  return models.programs.decoder_for(decode_key(mesh, latent_shape, chunk), make)


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
