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

IMPLS = ("auto", "jax", "pallas", "pallas_ff")

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
  """'auto' -> the kernels on GPU, plain JAX elsewhere; 'pallas_ff' (the FF's projection and GEGLU in one
  kernel) is 'pallas' for everything else."""
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
  if impl in ("pallas", "pallas_ff") and _geglu_block(i) is not None:
    lead = y.shape[:-1]
    out = _geglu_pallas(y.reshape(-1, 2 * i), interpret=interpret)
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


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows"))
def _geglu_pallas(y: jax.Array, *, interpret: bool = False, block_rows: int = 32) -> jax.Array:
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


# ------------------------------------------------------------------------------------------------
# The FF's projection and GEGLU in one kernel: out = a * gelu(gate), [a | gate] = x @ W + b. Two
# accumulators per output tile (columns j of a and of gate), so the [N, 2I] projection never goes to memory.


def proj_geglu(
  x: jax.Array, kernel: jax.Array, bias: jax.Array, *, impl: str = "auto", interpret: bool = False, dtype=None
) -> jax.Array:
  """``geglu(x @ kernel + bias)``: x [..., K], kernel [K, 2I], bias [2I] -> [..., I] in ``dtype`` (x's)."""
  dtype = dtype or x.dtype
  k, two_i = kernel.shape
  rows = x.size // k
  impl = resolve(impl) if not interpret else "pallas_ff"
  if impl == "pallas_ff" and _proj_geglu_fits(rows, k, two_i // 2):
    out = _proj_geglu_pallas(
      x.reshape(rows, k).astype(dtype), kernel.astype(dtype), bias.astype(dtype), interpret=interpret
    )
    return out.reshape(*x.shape[:-1], two_i // 2)
  y = jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
  return geglu(y, impl=impl)


_PG_BM, _PG_BN, _PG_BK = 128, 128, 64


def _proj_geglu_fits(rows: int, k: int, i: int) -> bool:
  return rows % _PG_BM == 0 and k % _PG_BK == 0 and i % _PG_BN == 0


def _proj_geglu_kernel(x_ref, wa_ref, wg_ref, ba_ref, bg_ref, o_ref, *, k_steps: int):
  bm, bn, bk = _PG_BM, _PG_BN, _PG_BK

  def body(kk, acc):
    acc_a, acc_g = acc
    from jax.experimental import pallas as pl

    xs = x_ref[:, pl.ds(kk * bk, bk)]  # [BM, BK]
    acc_a += jnp.dot(xs, wa_ref[pl.ds(kk * bk, bk), :], preferred_element_type=jnp.float32)
    acc_g += jnp.dot(xs, wg_ref[pl.ds(kk * bk, bk), :], preferred_element_type=jnp.float32)
    return acc_a, acc_g

  zero = jnp.zeros((bm, bn), jnp.float32)
  acc_a, acc_g = jax.lax.fori_loop(0, k_steps, body, (zero, zero))
  a = acc_a + ba_ref[...].astype(jnp.float32)[None]
  g = acc_g + bg_ref[...].astype(jnp.float32)[None]
  o_ref[...] = (a * (0.5 * g) * (1.0 + erf32(g * _SQRT_HALF))).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _proj_geglu_pallas(x: jax.Array, w: jax.Array, b: jax.Array, *, interpret: bool = False) -> jax.Array:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  n, k = x.shape
  i = w.shape[1] // 2
  bm, bn = _PG_BM, _PG_BN
  half = i // bn  # column blocks of a; gate's start after them
  return pl.pallas_call(
    functools.partial(_proj_geglu_kernel, k_steps=k // _PG_BK),
    out_shape=jax.ShapeDtypeStruct((n, i), x.dtype),
    grid=(n // bm, half),
    in_specs=[
      pl.BlockSpec((bm, k), lambda r, c: (r, 0)),
      pl.BlockSpec((k, bn), lambda r, c: (0, c)),
      pl.BlockSpec((k, bn), lambda r, c: (0, c + half)),
      pl.BlockSpec((bn,), lambda r, c: (c,)),
      pl.BlockSpec((bn,), lambda r, c: (c + half,)),
    ],
    out_specs=pl.BlockSpec((bm, bn), lambda r, c: (r, c)),
    compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=3),
    interpret=interpret,
  )(x, w, w, b, b)
