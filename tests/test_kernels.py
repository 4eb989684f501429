"""The step's kernels on CPU: the Pallas GEGLU through Pallas' interpreter against the plain formulation, its
erf against lax.erf, and the one-pass GroupNorm statistics against the two-pass reference and float64."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vinf_jax.layers import kernels, norm

RTOL = 1e-5  # float32


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_erf32_matches_lax_erf():
  x = jnp.linspace(-7.0, 7.0, 100_001, dtype=jnp.float32)
  assert float(jnp.max(jnp.abs(kernels.erf32(x) - jax.lax.erf(x)))) <= 5e-7


@pytest.mark.parametrize("rows, inner", [(64, 256), (100, 640), (37, 128)])  # partial row blocks too
def test_pallas_geglu_matches_plain(rows, inner):
  y = jnp.asarray(np.random.default_rng(rows).standard_normal((2, rows, 2 * inner)) * 2, jnp.float32)
  got = kernels.geglu(y, interpret=True)
  a, g = np.split(np.asarray(y, np.float64), 2, axis=-1)
  erf = np.vectorize(math.erf)
  want = a * 0.5 * g * (1 + erf(g / np.sqrt(2)))
  assert got.shape == (2, rows, inner)
  assert rel_err(got, want) <= RTOL
  assert rel_err(kernels.geglu(y, impl="jax"), want) <= RTOL


def test_kernel_impls_resolve():
  assert kernels.resolve("auto") == "jax"  # CPU
  assert kernels.geglu(jnp.ones((4, 6)), impl="pallas").shape == (4, 3)  # no power-of-two block: plain JAX
  with pytest.raises(ValueError, match="kernel impl='triton'"):
    kernels.resolve("triton")


@pytest.mark.parametrize("offset", [0.0, 3.0, 1e3])
@pytest.mark.parametrize("axes", [(2, 3), (1, 2, 3)])
def test_one_pass_group_stats(offset, axes):
  """Shifted one-pass sums stay accurate where E[x^2] - E[x]^2 would cancel (|mean| >> std): against the exact
  (float64) statistics of the float32 inputs."""
  x32 = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 6, 7, 64)) * 0.5 + offset, jnp.float32)
  xg = np.asarray(x32, np.float64).reshape(2, 5, 6, 7, 16, 4)
  red = (*axes, 5)
  mean, var = xg.mean(red, keepdims=True), xg.var(red, keepdims=True)
  for stats in (norm.group_stats, norm.group_stats_two_pass):
    m, v = stats(x32, 16, axes)
    assert m.shape == mean.shape and v.shape == var.shape
    assert rel_err(m, mean) <= RTOL and rel_err(v, var) <= RTOL, stats.__name__
