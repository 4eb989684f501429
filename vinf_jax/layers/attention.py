"""Attention: one wrapper for every softmax attention, the projections, and the temporal attentions.

Shapes: ``[batch, length, heads, head_dim]`` (jax.nn.dot_product_attention's BTNH) unless stated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vinf_jax.layers import kernels
from vinf_jax.parallel import FrameContext

AttnFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def resolve_implementation(impl: str, dtype) -> str:
  """'auto' -> cuDNN's fused (flash) kernel for 16-bit compute on a GPU that has it (compute capability
  8.0 or newer: A100, H100; not a T4), else XLA's (float32, CPU, older GPUs)."""
  if impl != "auto":
    return impl
  if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  cc = getattr(jax.devices()[0], "compute_capability", "0")
  return "cudnn" if float(cc) >= 8.0 else "xla"


def attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None, implementation: str = "xla"
) -> jax.Array:
  """softmax(q k^T / sqrt(d) + bias) v; q [B, Lq, H, D], k/v [B, Lk, H, D], bias broadcastable to
  [B, H, Lq, Lk] -> [B, Lq, H, D]."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


class CrossAttention(nnx.Module):
  """``to_q/to_k/to_v`` without bias, ``to_out`` (``to_out.0``) with bias; heads of ``dim_head``."""

  def __init__(
    self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, *, dtype, param_dtype, rngs: nnx.Rngs
  ):
    inner = heads * dim_head
    kv_dim = query_dim if context_dim is None else context_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.dim_head = heads, dim_head
    self.to_q = nnx.Linear(query_dim, inner, use_bias=False, **kw)
    self.to_k = nnx.Linear(kv_dim, inner, use_bias=False, **kw)
    self.to_v = nnx.Linear(kv_dim, inner, use_bias=False, **kw)
    self.to_out = nnx.Linear(inner, query_dim, **kw)

  def split(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.heads, self.dim_head)  # [..., L, H, D]

  def __call__(self, x: jax.Array, context: jax.Array | None, attn_fn: AttnFn) -> jax.Array:
    """x: [N, L, C]; context: [N, S, Cc] or None (self-attention); attn_fn on [N, L, H, D]."""
    ctx = x if context is None else context
    q, k, v = self.split(self.to_q(x)), self.split(self.to_k(ctx)), self.split(self.to_v(ctx))
    o = attn_fn(q, k, v)  # [N, L, H, D]
    return self.to_out(o.reshape(*o.shape[:-2], -1))


class FeedForward(nnx.Module):
  """GEGLU: ``proj`` (``ff.net.0.proj``) C -> 2*inner, a * gelu_exact(gate), ``out`` (``ff.net.2``)."""

  def __init__(self, dim: int, mult: int = 4, *, dtype, param_dtype, rngs: nnx.Rngs, kernel_impl: str = "jax"):
    inner = dim * mult
    self.kernel_impl = kernel_impl
    self.proj = nnx.Linear(dim, 2 * inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.Linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(kernels.geglu(self.proj(x), impl=self.kernel_impl))  # a * gelu(gate), a the first half


class BasicTransformerBlock(nnx.Module):
  """Pre-LN block: self-attention, attention to ``context`` (or a second self-attention), GEGLU FF."""

  def __init__(
    self,
    dim: int,
    heads: int,
    dim_head: int,
    context_dim: int | None,
    *,
    self_only: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    kernel_impl: str = "jax",
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_only = self_only
    self.attn1 = CrossAttention(dim, None, heads, dim_head, **kw)
    self.attn2 = CrossAttention(dim, None if self_only else context_dim, heads, dim_head, **kw)
    self.ff = FeedForward(dim, **kw, kernel_impl=kernel_impl)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, **kw)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, **kw)
    self.norm3 = nnx.LayerNorm(dim, epsilon=1e-5, **kw)

  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None,
    self_fn: AttnFn,
    cross_fn: AttnFn | None = None,
    *,
    zero_token: bool = False,
  ) -> jax.Array:
    """x: [N, L, C] (or [B, L, M, C] for the temporal layers: L frames of M positions).

    ``zero_token``: each self-attention's keys and values see one more token along axis 1, a zero after the L
    real ones (its K and V are zero: the projections have no bias); the queries are the L real tokens only.
    The zero is appended to the normalised input, where XLA writes it with the norm itself (no copy), so an
    attention function that needs a zero key (:func:`dual_scope_attention_zero_key`) gets it without
    concatenating K and V, and its queries fill whole tiles of a fused kernel (L, not L + 1).
    """

    def self_attn(attn, h):
      if not zero_token:
        return attn(h, None, self_fn)
      return attn(h, jnp.concatenate([h, jnp.zeros_like(h[:, :1])], axis=1), self_fn)

    x = x + self_attn(self.attn1, self.norm1(x))
    if self.self_only:
      x = x + self_attn(self.attn2, self.norm2(x))
    else:
      x = x + self.attn2(self.norm2(x), context, cross_fn or self_fn)
    return x + self.ff(self.norm3(x))


# --------------------------------------------------------------------------------------------------
# Temporal attention: every spatial position attends over frames. q/k/v: [B, T, M, H, D] with T the local
# frames and M = h*w positions (the activations' own frames-major layout: no transpose in or out); t: [B]
# timesteps (for the dual-scope phase bias). Positions and heads are independent attention problems, so
# they are folded into the heads axis of jax.nn.dot_product_attention's BTNH layout: N = M * H. That is
# what lets cuDNN's fused kernel run the temporal attention as it runs the spatial one.

# Logit bias of a key a query must not see (finite: exp of it is exactly 0 in float32, and it stays
# finite in float16 and bfloat16, so no -inf - -inf can arise in a fused kernel's running maximum).
MASKED = -3.0e4


def temporal_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, t: jax.Array, frames: FrameContext, *, implementation: str = "xla"
) -> jax.Array:
  if frames.temporal.attention == "full":
    return full_temporal_attention(q, k, v, frames, implementation=implementation)
  return dual_scope_attention(q, k, v, t, frames, implementation=implementation)


def uses_zero_key(frames: FrameContext, local_frames: int) -> bool:
  """Whether the temporal attention over ``local_frames`` runs as :func:`dual_scope_attention_zero_key`: dual
  scope on one device whose frames make one query block (every key a query needs is then a frame of its own
  clip, or a zero beyond the video's ends)."""
  cfg = frames.temporal
  return (
    cfg.attention == "dual"
    and frames.axis_name is None
    and query_block(local_frames, cfg.window, cfg.query_block) == local_frames
  )


def dual_scope_attention_zero_key(q, k, v, t, frames: FrameContext, *, implementation: str = "xla") -> jax.Array:
  """:func:`dual_scope_attention` on one device holding the whole video in one query block, without a copy of K/V.

  q: [B, T, M, H, D], the T frames; k/v: [B, T+1, M, H, D], the T frames and a zero frame after them
  (``BasicTransformerBlock``'s ``zero_token``); returns [B, T, M, H, D]. The official key set of query i,
  [P zeros | T frames | P zeros | G global frames] (plus the halo masking of ``video_ends='mask'``), has
  each frame once or twice (in the window and among the global frames) and zeros: a key's copies have the
  same logit, so one copy with bias ``log(sum of exp(bias of each copy))`` gives the same softmax, and the
  n_i visible zeros (logit 0, value 0) are one zero key with bias ``local bias + log(n_i)``. So the keys are
  the clip's own frames and the zero frame: T+1 keys instead of T+2P+G, read in place.
  """
  b, n, m, h, d = q.shape
  if k.shape[1] != n + 1 or v.shape[1] != n + 1:
    raise ValueError(f"keys of {k.shape[1]} and values of {v.shape[1]} frames for {n} query frames: expected {n + 1}")
  frames_bias, zero_bias = merged_dual_scope_bias(t, frames, n)
  bias = jnp.concatenate([frames_bias, zero_bias[..., None]], axis=-1)  # [B, T, T+1]
  o = attention(
    _heads_folded(q),
    _heads_folded(k),
    _heads_folded(v),
    bias=bias[:, None].astype(q.dtype),
    implementation=implementation,
  )
  return o.reshape(b, n, m, h, d)


def merged_dual_scope_bias(t: jax.Array, frames: FrameContext, n: int) -> tuple[jax.Array, jax.Array]:
  """The one-block dual-scope bias with each frame's copies merged (:func:`dual_scope_attention_zero_key`):
  ([B, T, T] over the clip's frames, [B, T] of the one zero key), float32."""
  cfg = frames.temporal
  p = cfg.window
  i, j = np.arange(n)[:, None], np.arange(n)[None]
  in_window = np.abs(i - j) <= p  # [T, T]
  is_global = np.isin(np.arange(n), frames.global_positions(n))[None]  # [1, T]
  zeros_seen = np.maximum(0, p - np.arange(n)) + np.maximum(0, np.arange(n) + p - (n - 1))  # [T]
  if cfg.video_ends == "mask":
    zeros_seen = np.zeros_like(zeros_seen)
  tb = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1)  # [B, 1, 1]
  local_bias = jnp.where(tb < cfg.local_phase_below, cfg.local_bias, 0.0)
  global_bias = jnp.where(tb >= cfg.global_phase_from, cfg.global_bias, 0.0)
  # exp of the larger of the two phase biases at most: no overflow for any bias a logit can carry
  top = jnp.maximum(local_bias, global_bias)
  weight = in_window * jnp.exp(local_bias - top) + is_global * jnp.exp(global_bias - top)  # [B, T, T]
  frames_bias = jnp.where(weight > 0, top + jnp.log(jnp.where(weight > 0, weight, 1.0)), MASKED)
  zero_bias = jnp.where(zeros_seen[:, None] > 0, local_bias + np.log(np.maximum(zeros_seen, 1))[:, None], MASKED)
  return frames_bias, jnp.broadcast_to(zero_bias[..., 0], (frames_bias.shape[0], n))


def _heads_folded(x: jax.Array) -> jax.Array:
  """[..., T, M, H, D] -> [..., T, M*H, D]."""
  return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def full_temporal_attention(q, k, v, frames: FrameContext, *, implementation: str = "xla") -> jax.Array:
  """Exact attention over all frames of the video (K/V all-gathered when split over devices)."""
  b, t, m, h, d = q.shape
  k, v = frames.all_frames(k, axis=1), frames.all_frames(v, axis=1)
  o = attention(_heads_folded(q), _heads_folded(k), _heads_folded(v), implementation=implementation)
  return o.reshape(b, t, m, h, d)


def query_block(local_frames: int, window: int, requested: int = 0) -> int:
  """Frames per query block: the largest divisor of T not above max(64, 2P) (or the one requested).

  A block of Q queries attends to its own Q + 2P local keys plus the G global ones: 64 keeps the keys
  per query near the 64 x 128 tiles of the fused kernel (Q=64, P=8, G=16: 96 keys).
  """
  if requested:
    if local_frames % requested:
      raise ValueError(f"query_block={requested} does not divide the {local_frames} frames per device")
    return requested
  cap = max(64, 2 * window)
  return max(q for q in range(1, min(local_frames, cap) + 1) if local_frames % q == 0)


def dual_scope_bias(t: jax.Array, frames: FrameContext, local_frames: int, block: int, dtype) -> jax.Array:
  """The additive logit bias [B, nb, Q, Q+2P+G] of every query block: MASKED outside the local window
  (and, with ``video_ends='mask'``, beyond the video's ends), the timestep-phase biases elsewhere."""
  cfg = frames.temporal
  p, nb = cfg.window, local_frames // block
  # key j of a block's window is visible to its query i iff i <= j <= i + 2P (|frame distance| <= P)
  i, j = np.arange(block)[:, None], np.arange(block + 2 * p)[None]
  visible = jnp.asarray(np.broadcast_to((j >= i) & (j <= i + 2 * p), (nb, block, block + 2 * p)))
  if cfg.video_ends == "mask":
    win = np.arange(nb)[:, None] * block + np.arange(block + 2 * p)[None]  # [nb, Q+2P] into the padded clip
    pos = frames.frame_offset(local_frames) + jnp.asarray(win - p)  # video index of each window key
    n = frames.total_frames(local_frames)
    visible = visible & ((pos >= 0) & (pos < n))[:, None, :]
  tb = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1)  # [B, 1, 1, 1]
  local_bias = jnp.where(tb < cfg.local_phase_below, cfg.local_bias, 0.0)
  global_bias = jnp.where(tb >= cfg.global_phase_from, cfg.global_bias, 0.0)
  local = jnp.where(visible[None], local_bias, MASKED)  # [B, nb, Q, Q+2P]
  g = len(frames.global_positions(frames.total_frames(local_frames)))
  glob = jnp.broadcast_to(global_bias, (*local.shape[:3], g))
  return jnp.concatenate([local, glob], axis=-1).astype(dtype)


def dual_scope_attention(q, k, v, t, frames: FrameContext, *, implementation: str = "xla") -> jax.Array:
  """Video-Infinity's dual-scope attention (method notes, section 3), blocked along the query frames.

  Query frame i (video index) sees the local keys i-P..i+P (K/V halos from the neighbouring devices;
  beyond the video's ends zeros that stay unmasked, or masked with ``video_ends='mask'``) and the G
  global keys (``global_frames``: k*N/G or the official's), in one softmax with the phase biases. Queries go in
  blocks of Q frames, each block against its own Q+2P local keys and the G global ones, the rest masked
  by the bias: one attention call (``implementation``: 'xla' or 'cudnn') whose memory grows linearly
  with the frames a device holds.
  """
  cfg = frames.temporal
  b, t_loc, m, h, d = q.shape
  n = frames.total_frames(t_loc)
  positions = frames.global_positions(n)
  p, g = cfg.window, len(positions)
  qb_len = query_block(t_loc, p, cfg.query_block)
  nb = t_loc // qb_len

  def keys_of(x):  # [B, T, M, H, D] -> [B*nb, Q+2P+G, M*H, D]
    left, right = frames.halo(x, p, axis=1)
    xe = jnp.concatenate([left, x, right], axis=1)  # [B, T+2P, M, H, D]
    if nb == 1:
      xw = xe[:, None]
    else:
      win = np.arange(nb)[:, None] * qb_len + np.arange(qb_len + 2 * p)[None]  # [nb, Q+2P] into xe
      xw = jnp.take(xe, win, axis=1)  # [B, nb, Q+2P, M, H, D]
    xg = frames.gather_frames(x, positions, axis=1)  # [B, G, M, H, D]
    xg = jnp.broadcast_to(xg[:, None], (b, nb, *xg.shape[1:]))
    return _heads_folded(jnp.concatenate([xw, xg], axis=2)).reshape(b * nb, qb_len + 2 * p + g, m * h, d)

  bias = dual_scope_bias(t, frames, t_loc, qb_len, q.dtype).reshape(b * nb, 1, qb_len, qb_len + 2 * p + g)
  qq = _heads_folded(q).reshape(b * nb, qb_len, m * h, d)
  o = attention(qq, keys_of(k), keys_of(v), bias=bias, implementation=implementation)
  return o.reshape(b, t_loc, m, h, d)


# --------------------------------------------------------------------------------------------------
# Dual-scope attention through the Pallas window kernel (``kernels.window_attention``): the same softmax
# as above, each program several (position, head) problems of one query block instead of cuDNN's one.

# Where the kernel runs: 'on' (GPUs where cuDNN's fused attention would run: 16-bit compute, compute capability
# 8.0+; see ``TemporalTransformer``), 'merged' (there, in its one-block form only), 'off' (cuDNN's fused attention
# or XLA's, as before the kernel) or 'interpret' (everywhere it applies, through Pallas' interpreter: the CPU
# tests). 'on' by default since it was measured (2026-12-07, one H100, benchmarks/RESULTS.md): the guided step
# at F=64 269.0 -> 246.8 ms in one call, the F=1152 step 0.7% faster (8 problems a program), bf16 error per
# call as cuDNN's (2.4e-3), the same peak memory. Read at each trace (benchmarks.bench_step --temporal_kernel).
TEMPORAL_KERNEL = "on"


def _pow2_at_least_16(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def window_kernel_plan(frames: FrameContext, local_frames: int, head_dim: int) -> str | None:
  """'merged' (one block on one device: the clip's T frames plus one zero key, merged biases), 'blocked'
  (query blocks against their windows and the global frames), or None where the kernel does not apply."""
  cfg = frames.temporal
  if cfg.attention != "dual":
    return None
  if uses_zero_key(frames, local_frames):
    return "merged" if kernels.window_attention_applies(local_frames, head_dim) else None
  qb = query_block(local_frames, cfg.window, cfg.query_block)
  g = len(frames.global_positions(frames.total_frames(local_frames)))
  ok = kernels.window_attention_applies(qb, head_dim, _pow2_at_least_16(g) if g else 0)
  return "blocked" if ok else None


def dual_scope_attention_kernel(q, k, v, t, frames: FrameContext, *, interpret: bool = False) -> jax.Array:
  """:func:`dual_scope_attention` (q/k/v [B, T, M, H, D], no zero frame) through ``kernels.window_attention``.

  'merged': the keys are the T frames in place, with :func:`merged_dual_scope_bias` and its zero key.
  'blocked': query block i of Q frames sees rows iQ..(i+c)Q-1 of the halo-extended clip (c = 1 + ceil(2P/Q)
  chunks of Q, zero-padded at the end; the Q+2P official keys first, the rest masked) and the G global frames
  (zero-padded to a power of two, masked), with :func:`dual_scope_bias`.
  """
  cfg = frames.temporal
  b, tl, m, h, d = q.shape
  plan = window_kernel_plan(frames, tl, d)
  if plan is None:
    raise ValueError(f"the window kernel does not take {tl} local frames of head dim {d} ({cfg.attention} attention)")
  if plan == "merged":
    fb, zb = merged_dual_scope_bias(t, frames, tl)
    fq, fk, fv = (_heads_folded(x) for x in (q, k, v))
    o = kernels.window_attention(fq, fk, fv, fb[:, None, None], zero_bias=zb[:, None], interpret=interpret)
    return o.reshape(q.shape)
  p = cfg.window
  qb = query_block(tl, p, cfg.query_block)
  nb, c = tl // qb, 1 + -(-2 * p // qb)
  positions = frames.global_positions(frames.total_frames(tl))
  g, g_pad = len(positions), _pow2_at_least_16(len(positions)) if positions else 0
  pad = (nb + c - 1) * qb - (tl + 2 * p)

  def padded(x, n, axis, value=0.0):  # x with n entries of value appended along axis
    return jnp.pad(x, [(0, n if a == axis else 0) for a in range(x.ndim)], constant_values=value)

  def window_of(x):  # [B, T, M, H, D] -> [B, (nb+c-1)Q, M*H, D]
    left, right = frames.halo(x, p, axis=1)
    return _heads_folded(padded(jnp.concatenate([left, x, right], axis=1), pad, 1))

  bias = dual_scope_bias(t, frames, tl, qb, jnp.float32)  # [B, nb, Q, Q+2P+G]
  bw = padded(bias[..., : qb + 2 * p], c * qb - qb - 2 * p, 3, MASKED)  # the padding keys masked
  bw = bw.reshape(b, nb, qb, c, qb).transpose(0, 1, 3, 2, 4)  # [B, nb, c, Q, Q]
  kg = vg = bg = None
  if g:
    bg = padded(bias[..., qb + 2 * p :], g_pad - g, 3, MASKED)
    kg, vg = (_heads_folded(padded(frames.gather_frames(x, positions, axis=1), g_pad - g, 1)) for x in (k, v))
  o = kernels.window_attention(
    _heads_folded(q), window_of(k), window_of(v), bw, kg=kg, vg=vg, bias_g=bg, interpret=interpret
  )
  return o.reshape(q.shape)
