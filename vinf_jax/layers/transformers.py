"""Spatial transformer (per frame, cross-attention to text) and temporal transformer (over frames)."""

from __future__ import annotations

import jax
from flax import nnx

from vinf_jax.layers.attention import BasicTransformerBlock, attention, temporal_attention
from vinf_jax.layers.norm import GroupNorm
from vinf_jax.parallel import FrameContext


class SpatialTransformer(nnx.Module):
  """GroupNorm (eps 1e-6, per frame) -> Linear proj_in -> block -> Linear proj_out -> residual."""

  def __init__(
    self,
    ch: int,
    heads: int,
    dim_head: int,
    context_dim: int,
    groups: int,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    attention_impl: str = "xla",
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    self.impl = attention_impl
    self.norm = GroupNorm(ch, groups, 1e-6, dtype=dtype, param_dtype=param_dtype)
    self.proj_in = nnx.Linear(ch, inner, **kw)
    self.transformer_blocks = nnx.List(
      [BasicTransformerBlock(inner, heads, dim_head, context_dim, self_only=False, **kw)]
    )
    self.proj_out = nnx.Linear(inner, ch, **kw)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, T, H, W, C]; context: [B, S, Cc] (one text for all frames) or [B, T, S, Cc]."""
    b, t, hh, ww, c = x.shape
    h = self.norm(x, axes=(2, 3)).reshape(b * t, hh * ww, c)  # [B*T, HW, C]
    h = self.proj_in(h)
    if context.ndim == 4:
      context = context.reshape(b * t, *context.shape[2:])  # [B*T, S, Cc]

    def self_fn(q, k, v):  # [B*T, HW, heads, d]
      return attention(q, k, v, implementation=self.impl)

    def cross_fn(q, k, v):  # q [B*T, HW, heads, d]; k/v [B, S, ...] (shared text) or [B*T, S, ...]
      if k.shape[0] == q.shape[0]:
        return attention(q, k, v, implementation=self.impl)
      # Every frame attends to the same text: one long query sequence per batch element.
      o = attention(q.reshape(b, t * hh * ww, *q.shape[2:]), k, v, implementation=self.impl)
      return o.reshape(q.shape)

    for blk in self.transformer_blocks:
      h = blk(h, context, self_fn, cross_fn)
    h = self.proj_out(h).reshape(b, t, hh, ww, c)
    return x + h


class TemporalTransformer(nnx.Module):
  """GroupNorm (eps 1e-6, over the whole clip) -> proj_in -> two self-attentions over frames + FF.

  No position encoding. ``init_attn`` is one of these with an inner width (8 x 64 = 512) different
  from its channels; its Conv1d projections are stored as Linear.
  """

  def __init__(self, ch: int, heads: int, dim_head: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    self.norm = GroupNorm(ch, groups, 1e-6, dtype=dtype, param_dtype=param_dtype)
    self.proj_in = nnx.Linear(ch, inner, **kw)
    self.transformer_blocks = nnx.List([BasicTransformerBlock(inner, heads, dim_head, None, self_only=True, **kw)])
    self.proj_out = nnx.Linear(inner, ch, **kw)

  def __call__(self, x: jax.Array, t: jax.Array, frames: FrameContext) -> jax.Array:
    """x: [B, T, H, W, C] local frames; t: [B] timesteps (dual-scope phase)."""
    b, tl, hh, ww, c = x.shape
    m = hh * ww
    h = self.norm(x, axes=(1, 2, 3), sum_fn=frames.sum_frames)  # statistics over the clip
    h = h.transpose(0, 2, 3, 1, 4).reshape(b * m, tl, c)  # [B*HW, T, C]
    h = self.proj_in(h)

    def self_fn(q, k, v):  # [B*HW, T, heads, d]
      shp = (b, m, tl, *q.shape[2:])
      o = temporal_attention(q.reshape(shp), k.reshape(shp), v.reshape(shp), t, frames)
      return o.reshape(q.shape)

    for blk in self.transformer_blocks:
      h = blk(h, None, self_fn)
    h = self.proj_out(h).reshape(b, hh, ww, tl, c).transpose(0, 3, 1, 2, 4)
    return x + h
