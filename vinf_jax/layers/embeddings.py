"""Sinusoidal timestep/fps embedding and its MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[B] -> [B, dim] float32; cos first, frequency shift 0 (VideoCrafter2's ``timestep_embedding``)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def guidance_embedding(w: jax.Array, dim: int = 256) -> jax.Array:
  """[B] -> [B, dim] float32: T2V-Turbo's (and LCM's) embedding of the guidance scale w.

  ``1000 w`` against ``exp(-k ln(10000) / (dim/2 - 1))``, k = 0..dim/2-1, sin first: unlike
  :func:`timestep_embedding` (cos first, ``/ (dim/2)``).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = 1000.0 * jnp.asarray(w, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimestepMLP(nnx.Module):
  """Linear -> SiLU -> Linear (keys ``.0`` and ``.2`` of ``time_embed`` / ``fps_embedding``)."""

  def __init__(self, in_dim: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.linear_1 = nnx.Linear(in_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_2 = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))
