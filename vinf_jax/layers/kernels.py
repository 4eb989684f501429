"""Pallas (Triton) kernels for the step's memory-bound elementwise passes on GPU, with plain-JAX fallbacks.

Each public function picks its implementation: ``impl='pallas'`` (GPU only; a Triton kernel through
``jax.experimental.pallas``), ``'jax'`` (the plain formulation XLA fuses itself: CPU, tests, the float32
reference) or ``'auto'`` (Pallas on a GPU where it applies, else plain JAX). Both compute the same function;
the kernels only change how many bytes go through memory. ``interpret=True`` runs a kernel through Pallas'
interpreter (CPU tests of the kernel body).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("auto", "jax", "pallas")

# float32 erf as a rational function of x on [-4, 4] (the minimax coefficients of Eigen's and XLA's float32
# erf), +-1 outside: the Triton lowering of Pallas has no erf primitive. |error| <= 5e-7 against lax.erf.
_ERF_P = (
  -2.72614225801306e-10,
  2.77068142495902e-08,
  -2.10102402082508e-06,
  -5.69250639462346e-05,
  -7.34990630326855e-04,
  -2.95459980854025e-03,
  -1.60960333262415e-02,
)
_ERF_Q = (
  -1.45660718464996e-05,
  -2.13374055278905e-04,
  -1.68282697438203e-03,
  -7.37332916720468e-03,
  -1.42647390514189e-02,
)
_SQRT_HALF = 0.7071067811865476


def erf32(x: jax.Array) -> jax.Array:
  """erf of float32 ``x`` from basic arithmetic only (usable inside a Triton kernel)."""
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = jnp.float32(_ERF_P[0])
  for c in _ERF_P[1:]:
    p = p * x2 + c
  q = jnp.float32(_ERF_Q[0])
  for c in _ERF_Q[1:]:
    q = q * x2 + c
  return x * p / q


def resolve(impl: str) -> str:
  """'auto' -> the kernels on GPU, plain JAX elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f"kernel impl={impl!r}, expected one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "jax"
  return impl


# ------------------------------------------------------------------------------------------------
# GEGLU: a * gelu(gate) of the FF's projection [..., 2I] (a = first half) -> [..., I]


def geglu(y: jax.Array, *, impl: str = "auto", interpret: bool = False) -> jax.Array:
  """``a * gelu_exact(gate)`` with ``a, gate = split(y, 2, -1)``: [..., 2I] -> [..., I] in y's dtype."""
  i = y.shape[-1] // 2
  impl = resolve(impl) if not interpret else "pallas"
  rows = y.size // max(1, y.shape[-1])
  # whole row blocks only on GPU: what Triton does with a partial block was not checked there (the
  # interpreter, CPU tests, pads it); XLA's fusion takes the rest
  whole = interpret or rows % _GEGLU_ROWS == 0
  if impl == "pallas" and _geglu_block(i) is not None and whole:
    lead = y.shape[:-1]
    out = _geglu_pallas(y.reshape(-1, 2 * i), interpret=interpret, block_rows=_GEGLU_ROWS)
    return out.reshape(*lead, i)
  a, gate = jnp.split(y, 2, axis=-1)
  return a * jax.nn.gelu(gate, approximate=False)


def _geglu_block(i: int) -> int | None:
  """Columns per block: a power of two dividing I (Triton's blocks are powers of two), or None."""
  for bc in (256, 128, 64):
    if i % bc == 0:
      return bc
  return None


def _geglu_kernel(a_ref, g_ref, o_ref):
  a = a_ref[...].astype(jnp.float32)
  g = g_ref[...].astype(jnp.float32)
  o_ref[...] = (a * (0.5 * g) * (1.0 + erf32(g * _SQRT_HALF))).astype(o_ref.dtype)


# rows per block: 16 (0.66 against 0.78 ms with 32 at level 0, in isolation on an H200; the guided step at F=64
# 260.5 against 263.6 ms, one H200, 2026-12-07: benchmarks/RESULTS.md); read at each trace, so
# benchmarks.bench_step --geglu_rows can try another
_GEGLU_ROWS = 16


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows"))
def _geglu_pallas(y: jax.Array, *, interpret: bool = False, block_rows: int = _GEGLU_ROWS) -> jax.Array:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  n, two_i = y.shape
  i = two_i // 2
  bc = _geglu_block(i)
  y3 = y.reshape(n, 2, i)  # [N, (a, gate), I]: the same buffer read through two block specs
  spec = lambda half: pl.BlockSpec((block_rows, None, bc), lambda r, c: (r, half, c))
  return pl.pallas_call(
    _geglu_kernel,
    out_shape=jax.ShapeDtypeStruct((n, i), y.dtype),
    grid=(pl.cdiv(n, block_rows), i // bc),
    in_specs=[spec(0), spec(1)],
    out_specs=pl.BlockSpec((block_rows, bc), lambda r, c: (r, c)),
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    interpret=interpret,
  )(y3, y3)
