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
  """Mean and (biased) variance per group, pooled over ``axes`` and the group's channels, in one read of ``x``.

  The sums of ``d = x - s`` and ``d^2`` are taken together (one pass over ``x``: XLA fuses the two sibling
  reductions into one kernel) about a shift ``s`` per group: the group's channels at the first index of the
  pooled axes. Any ``s`` near the data keeps ``E[d^2] - E[d]^2`` free of cancellation (the float32 error
  grows with ``((s - mean) / std)^2``, about 1 for a shift drawn from the data itself), where the plain
  ``E[x^2] - E[x]^2`` loses every digit once ``|mean| >> std``. With ``sum_fn`` (a ``psum`` over the devices
  that split the pooled axes), each device's mean and sum of squared deviations are combined exactly (Chan
  et al.'s pairwise update): the shifts need not agree between devices.

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
  count = 1
  for a in red:
    count *= xg.shape[a]
  shift = xg
  for a in red[:-1]:
    shift = jax.lax.slice_in_dim(shift, 0, 1, axis=a)
  shift = jax.lax.stop_gradient(jnp.mean(shift, axis=red[-1], keepdims=True))  # [..., G, 1], pooled axes 1
  d = xg - shift
  s1 = jnp.sum(d, axis=red, keepdims=True)
  s2 = jnp.sum(jnp.square(d), axis=red, keepdims=True)
  mean = shift + s1 / count
  m2 = jnp.maximum(s2 - s1 * (s1 / count), 0.0)  # this device's sum of squared deviations from ``mean``
  if sum_fn is None:
    return mean, m2 / count
  total = sum_fn(jnp.float32(count))
  mean_all = sum_fn(count * mean) / total
  m2_all = sum_fn(m2 + count * jnp.square(mean - mean_all))
  return mean_all, m2_all / total


def group_stats_two_pass(
  x: jax.Array, groups: int, axes: Sequence[int], sum_fn: Callable[[jax.Array], jax.Array] | None = None
) -> tuple[jax.Array, jax.Array]:
  """The textbook two-pass statistics (mean first, then the mean squared deviation): the tests' reference."""
  c = x.shape[-1]
  xg = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, c // groups)
  red = tuple(a % x.ndim for a in axes) + (xg.ndim - 1,)
  count = 1.0
  for a in red:
    count *= xg.shape[a]
  sum_fn = sum_fn or (lambda v: v)
  count = sum_fn(jnp.float32(count))
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
