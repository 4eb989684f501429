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


# ------------------------------------------------------------------------------------------------
# Temporal attention over short frame windows: many tiny attention problems (every position and head of
# every query block), a few hundred bytes each. cuDNN's fused kernel runs each (position, head) as its own
# tile with its own prologue: at the UNet's level 0 (2 x 2,560 positions x 5 heads, 64 frames) about 1.4 ms
# a call on an H100 against the 0.18 ms that reading Q, K, V and writing O once takes. This kernel gives each
# program several heads of one query block and keeps the block's bias in registers across them.


# Problems (position, head) per program and warps per program, by form: 'merged' (one block of keys, the zero
# key) and 'blocked' (c >= 2 window chunks and the global keys). Read at each trace; measured per form on a GPU by
# ``python -m benchmarks.attention_check --window_sweep`` (benchmarks/RESULTS.md, "The temporal attention's
# window kernel"; 2026-12-07, one H100): 4 problems and 4 warps were the fastest in each of the four cases
# timed but one (1,152 frames: 1 problem, 1.101 ms, against 1.187), e.g. level 0 at F=64 0.488 ms against 8
# problems' 0.672 and 256 frames (blocked) 1.208 against 2.280 (a blocked program holds c + 1 logit tiles
# per problem: 8 of them spill).
WINDOW_TUNING = {"merged": (4, 4), "blocked": (4, 4)}


def window_attention_applies(block: int, head_dim: int, num_global: int = 0) -> bool:
  """Whether :func:`window_attention` takes these shapes: Triton's dots need power-of-two sides of at least 16."""
  pow2 = lambda n: n >= 16 and n & (n - 1) == 0
  return pow2(block) and pow2(head_dim) and (num_global == 0 or pow2(num_global))


def window_attention(
  q: jax.Array,
  kw: jax.Array,
  vw: jax.Array,
  bias_w: jax.Array,
  *,
  kg: jax.Array | None = None,
  vg: jax.Array | None = None,
  bias_g: jax.Array | None = None,
  zero_bias: jax.Array | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Blocked attention along axis 1 with every head sharing one bias; -> q's shape and dtype.

  q: [B, nb*Q, N, D] (N independent problems: positions x heads); query block i (rows iQ..iQ+Q-1) sees
  the c*Q window keys at rows iQ..(i+c)Q-1 of kw/vw: [B, (nb+c-1)*Q, N, D], with bias_w: [B, nb, c, Q, Q]
  (float32; a key it must not see carries a large negative bias); optionally G more keys kg/vg:
  [B, G, N, D] shared by every block, with bias_g: [B, nb, Q, G]; and optionally a key of logit 0 and value 0
  with bias zero_bias: [B, nb, Q] (the zeros past a video's ends, counted by the bias). Logits are
  q.k / sqrt(D) + bias, softmax in float32, the probabilities in q's dtype for the second product (as a
  fused flash kernel does), float32 accumulation.
  """
  b, t, n, d = q.shape
  nb, c, qb = bias_w.shape[1], bias_w.shape[2], bias_w.shape[3]
  if t != nb * qb or kw.shape[1] != (nb + c - 1) * qb or bias_w.shape[4] != qb:
    raise ValueError(f"window_attention: q {q.shape}, window keys {kw.shape}, bias {bias_w.shape} do not agree")
  g = 0 if kg is None else kg.shape[1]
  if not window_attention_applies(qb, d, g):
    raise ValueError(f"window_attention: block {qb}, head dim {d}, {g} global keys: not powers of two >= 16")
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  heads, warps = WINDOW_TUNING["merged" if c == 1 else "blocked"]
  return _window_attention_pallas(
    q, kw, vw, f32(bias_w), kg, vg, f32(bias_g), f32(zero_bias), heads=heads, warps=warps, interpret=interpret
  )


def _heads_per_program(n: int, cap: int) -> int:
  for nh in (8, 4, 2, 1):
    if nh <= cap and n % nh == 0:
      return nh
  return 1


def _window_attention_kernel(*refs, chunks: int, has_g: bool, has_z: bool, heads: int, scale: float):
  refs = list(refs)
  q_ref = refs.pop(0)
  k_refs = [refs.pop(0) for _ in range(chunks)]
  v_refs = [refs.pop(0) for _ in range(chunks)]
  b_refs = [refs.pop(0) for _ in range(chunks)]
  kg_ref, vg_ref, bg_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if has_g else (None, None, None)
  z_ref = refs.pop(0) if has_z else None
  (o_ref,) = refs
  biases = [r[...] for r in b_refs]  # [Q, Q] each, float32, shared by the program's heads
  bg = bg_ref[...] if has_g else None
  z = z_ref[...] if has_z else None
  dims = (((1,), (1,)), ((), ()))  # q k^T
  for h in range(heads):
    qh = q_ref[:, h, :]
    keys = [k[:, h, :] for k in k_refs] + ([kg_ref[:, h, :]] if has_g else [])
    s = [jax.lax.dot_general(qh, kh, dims, preferred_element_type=jnp.float32) * scale for kh in keys]
    s = [x + bj for x, bj in zip(s, biases + ([bg] if has_g else []), strict=True)]
    m = functools.reduce(jnp.maximum, [jnp.max(x, axis=1) for x in s])
    if has_z:
      m = jnp.maximum(m, z)
    p = [jnp.exp(x - m[:, None]) for x in s]
    denom = functools.reduce(jnp.add, [jnp.sum(x, axis=1) for x in p])
    if has_z:
      denom = denom + jnp.exp(z - m)
    vs = [v[:, h, :] for v in v_refs] + ([vg_ref[:, h, :]] if has_g else [])
    pv = [jnp.dot(x.astype(vh.dtype), vh, preferred_element_type=jnp.float32) for x, vh in zip(p, vs, strict=True)]
    acc = functools.reduce(jnp.add, pv)
    o_ref[:, h, :] = (acc / denom[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("heads", "warps", "interpret"))
def _window_attention_pallas(q, kw, vw, bias_w, kg, vg, bias_g, zero_bias, *, heads: int, warps: int, interpret: bool):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  b, t, n, d = q.shape
  nb, c, qb = bias_w.shape[1], bias_w.shape[2], bias_w.shape[3]
  nh = _heads_per_program(n, heads)
  rows = lambda j: pl.BlockSpec((None, qb, nh, d), lambda hi, i, bi: (bi, i + j, hi, 0))
  in_specs = [rows(0)] + [rows(j) for j in range(c)] * 2
  in_specs += [pl.BlockSpec((None, None, None, qb, qb), lambda hi, i, bi, j=j: (bi, i, j, 0, 0)) for j in range(c)]
  args = [q] + [kw] * c + [vw] * c + [bias_w] * c
  has_g, has_z = kg is not None, zero_bias is not None
  if has_g:
    g = kg.shape[1]
    glob = pl.BlockSpec((None, g, nh, d), lambda hi, i, bi: (bi, 0, hi, 0))
    in_specs += [glob, glob, pl.BlockSpec((None, None, qb, g), lambda hi, i, bi: (bi, i, 0, 0))]
    args += [kg, vg, bias_g]
  if has_z:
    in_specs.append(pl.BlockSpec((None, None, qb), lambda hi, i, bi: (bi, i, 0)))
    args.append(zero_bias)
  kernel = functools.partial(
    _window_attention_kernel, chunks=c, has_g=has_g, has_z=has_z, heads=nh, scale=1.0 / float(d) ** 0.5
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    # the head groups first: CUDA's grid x takes 2^31 - 1 programs, y and z 65,535
    grid=(n // nh, nb, b),
    in_specs=in_specs,
    out_specs=rows(0),
    compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
    interpret=interpret,
  )(*args)
