"""GroupNorm with float32 statistics over chosen axes, optionally summed over devices.

Flax's GroupNorm defaults to epsilon 1e-6 and PyTorch's to 1e-5; every caller here passes epsilon
explicitly (architecture notes, section 9).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def group_stats(
  x: jax.Array, groups: int, axes: Sequence[int], sum_fn: Callable[[jax.Array], jax.Array] | None = None
) -> tuple[jax.Array, jax.Array]:
  """Two-pass mean and (biased) variance per group, pooled over ``axes`` and the group's channels.

  Args:
    x: ``[..., C]``; statistics are taken in float32.
    groups: channel groups.
    axes: the non-channel axes of ``x`` to pool (the remaining ones are kept, e.g. batch).
    sum_fn: reduces partial sums across devices (``psum``) when the pooled axes are split over devices.

  Returns:
    mean, var: shaped like ``x`` reshaped to ``[..., G, C/G]`` with pooled axes kept as size 1.
  """
  c = x.shape[-1]
  xg = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, c // groups)
  red = tuple(a % x.ndim for a in axes) + (xg.ndim - 1,)
  count = 1.0
  for a in red:
    count *= xg.shape[a]
  count = jnp.float32(count)
  sum_fn = sum_fn or (lambda v: v)
  count = sum_fn(count)
  mean = sum_fn(jnp.sum(xg, axis=red, keepdims=True)) / count
  var = sum_fn(jnp.sum(jnp.square(xg - mean), axis=red, keepdims=True)) / count
  return mean, var


class GroupNorm(nnx.Module):
  """GroupNorm whose statistics may come from a slice of the input and be summed over devices."""

  def __init__(
    self,
    num_features: int,
    num_groups: int,
    epsilon: float,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    del rngs
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(
    self,
    x: jax.Array,
    *,
    axes: Sequence[int],
    stats_from: jax.Array | None = None,
    sum_fn: Callable[[jax.Array], jax.Array] | None = None,
  ) -> jax.Array:
    """Normalise ``x`` ([..., C]) with statistics pooled over ``axes`` of ``stats_from`` (default x)."""
    mean, var = group_stats(x if stats_from is None else stats_from, self.num_groups, axes, sum_fn)
    return self.normalize(x, mean, jax.lax.rsqrt(var + self.epsilon))

  def normalize(self, x: jax.Array, mean: jax.Array, inv_std: jax.Array) -> jax.Array:
    """Normalise ``x`` ([..., C]) with given statistics (shaped as :func:`group_stats` returns them, or
    broadcastable to ``[..., G, C/G]``), then scale and shift: statistics taken once, applied to pieces."""
    c = x.shape[-1]
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    y = ((xg - mean) * inv_std).reshape(x.shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)
