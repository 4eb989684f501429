"""Attention: one wrapper for every softmax attention, the projections, and the temporal attentions.

Shapes: ``[batch, length, heads, head_dim]`` (jax.nn.dot_product_attention's BTNH) unless stated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vinf_jax.parallel import FrameContext, global_positions

AttnFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def resolve_implementation(impl: str, dtype) -> str:
  """'auto' -> cuDNN's fused kernel for 16-bit compute on a GPU, else XLA's (float32, CPU)."""
  if impl != "auto":
    return impl
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "xla") -> jax.Array:
  """softmax(q k^T / sqrt(d)) v; q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


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

  def __init__(self, dim: int, mult: int = 4, *, dtype, param_dtype, rngs: nnx.Rngs):
    inner = dim * mult
    self.proj = nnx.Linear(dim, 2 * inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.Linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    a, gate = jnp.split(self.proj(x), 2, axis=-1)  # a is the first half
    return self.out(a * jax.nn.gelu(gate, approximate=False))


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
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_only = self_only
    self.attn1 = CrossAttention(dim, None, heads, dim_head, **kw)
    self.attn2 = CrossAttention(dim, None if self_only else context_dim, heads, dim_head, **kw)
    self.ff = FeedForward(dim, **kw)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, **kw)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, **kw)
    self.norm3 = nnx.LayerNorm(dim, epsilon=1e-5, **kw)

  def __call__(
    self, x: jax.Array, context: jax.Array | None, self_fn: AttnFn, cross_fn: AttnFn | None = None
  ) -> jax.Array:
    x = x + self.attn1(self.norm1(x), None, self_fn)
    x = x + self.attn2(self.norm2(x), None if self.self_only else context, cross_fn or self_fn)
    return x + self.ff(self.norm3(x))


# --------------------------------------------------------------------------------------------------
# Temporal attention: every spatial position attends over frames. q/k/v: [B, M, T, H, D] with M = h*w
# tokens of one frame and T the local frames; t: [B] timesteps (for the dual-scope phase bias).


def temporal_attention(q: jax.Array, k: jax.Array, v: jax.Array, t: jax.Array, frames: FrameContext) -> jax.Array:
  if frames.temporal.attention == "full":
    return full_temporal_attention(q, k, v, frames)
  return dual_scope_attention(q, k, v, t, frames)


def full_temporal_attention(q, k, v, frames: FrameContext) -> jax.Array:
  """Exact attention over all frames of the video (K/V all-gathered when split over devices)."""
  b, m, t, h, d = q.shape
  k, v = frames.all_frames(k, axis=2), frames.all_frames(v, axis=2)
  n = k.shape[2]
  o = attention(q.reshape(b * m, t, h, d), k.reshape(b * m, n, h, d), v.reshape(b * m, n, h, d))
  return o.reshape(b, m, t, h, d)


def query_block(local_frames: int, window: int, requested: int = 0) -> int:
  """Frames per query block: the largest divisor of T not above max(32, 2P) (or the one requested)."""
  if requested:
    if local_frames % requested:
      raise ValueError(f"query_block={requested} does not divide the {local_frames} frames per device")
    return requested
  cap = max(32, 2 * window)
  return max(q for q in range(1, min(local_frames, cap) + 1) if local_frames % q == 0)


def dual_scope_attention(q, k, v, t, frames: FrameContext) -> jax.Array:
  """Video-Infinity's dual-scope attention (method notes, section 3), blocked along the query frames.

  Query frame i (video index) sees the local keys i-P..i+P (K/V halos from the neighbouring devices;
  beyond the video's ends zeros that stay unmasked, or masked with ``video_ends='mask'``) and the G
  global keys at video indices k*N/G, in one softmax with the timestep-phase logit biases.
  Queries are processed in blocks of Q frames, each against its own Q+2P local keys, so memory grows
  linearly with the frames a device holds.
  """
  cfg = frames.temporal
  b, m, t_loc, h, d = q.shape
  p = cfg.window
  n = frames.total_frames(t_loc)
  scale = d**-0.5
  f32 = jnp.float32

  kl, kr = frames.halo(k, p, axis=2)
  vl, vr = frames.halo(v, p, axis=2)
  ke = jnp.concatenate([kl, k, kr], axis=2)  # [B, M, T+2P, H, D]
  ve = jnp.concatenate([vl, v, vr], axis=2)
  qb_len = query_block(t_loc, p, cfg.query_block)
  nb = t_loc // qb_len
  win = np.arange(nb)[:, None] * qb_len + np.arange(qb_len + 2 * p)[None]  # [nb, Q+2P] into ke
  kw = jnp.take(ke, win, axis=2)  # [B, M, nb, Q+2P, H, D]
  vw = jnp.take(ve, win, axis=2)
  qb = q.reshape(b, m, nb, qb_len, h, d)

  gpos = global_positions(n, cfg.num_global)
  kg = frames.gather_frames(k, gpos, axis=2)  # [B, M, G, H, D]
  vg = frames.gather_frames(v, gpos, axis=2)

  logits_l = jnp.einsum("bmnqhd,bmnkhd->bmnhqk", qb, kw, preferred_element_type=f32) * scale
  logits_g = jnp.einsum("bmnqhd,bmghd->bmnhqg", qb, kg, preferred_element_type=f32) * scale

  # key j of a block's window is visible to its query i iff i <= j <= i + 2P (|frame distance| <= P)
  i, j = np.arange(qb_len)[:, None], np.arange(qb_len + 2 * p)[None]
  visible = jnp.asarray(np.broadcast_to((j >= i) & (j <= i + 2 * p), (nb, qb_len, qb_len + 2 * p)))
  if cfg.video_ends == "mask":
    pos = frames.frame_offset(t_loc) + jnp.asarray(win - p)  # video index of each window key
    inside = (pos >= 0) & (pos < n)
    visible = visible & inside[:, None, :]

  tb = jnp.asarray(t, f32).reshape(b, 1, 1, 1, 1, 1)
  local_bias = jnp.where(tb < cfg.local_phase_below, cfg.local_bias, 0.0)
  global_bias = jnp.where(tb >= cfg.global_phase_from, cfg.global_bias, 0.0)
  logits_l = jnp.where(visible[None, None, :, None], logits_l + local_bias, -jnp.inf)
  logits_g = logits_g + global_bias

  probs = jax.nn.softmax(jnp.concatenate([logits_l, logits_g], axis=-1), axis=-1)
  pl, pg = probs[..., : qb_len + 2 * p].astype(v.dtype), probs[..., qb_len + 2 * p :].astype(v.dtype)
  o = jnp.einsum("bmnhqk,bmnkhd->bmnqhd", pl, vw, preferred_element_type=f32)
  o = o + jnp.einsum("bmnhqg,bmghd->bmnqhd", pg, vg, preferred_element_type=f32)
  return o.reshape(b, m, t_loc, h, d).astype(v.dtype)
