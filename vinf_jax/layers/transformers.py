"""Spatial transformer (per frame, cross-attention to text) and temporal transformer (over frames)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vinf_jax.layers import attention as attention_lib
from vinf_jax.layers.attention import (
  BasicTransformerBlock,
  attention,
  dual_scope_attention_kernel,
  dual_scope_attention_zero_key,
  temporal_attention,
  uses_zero_key,
  window_kernel_plan,
)
from vinf_jax.layers.norm import GroupNorm, group_stats
from vinf_jax.parallel import FrameContext


def map_chunks(fn: Callable, args: Sequence[jax.Array], *, axis: int, chunk: int):
  """``fn(*args)`` computed ``chunk`` indices of ``axis`` at a time, so only one chunk's intermediates are live.

  ``fn`` must treat the indices along ``axis`` independently (frames of a per-frame layer, positions
  of an attention over frames) and return a pytree of arrays with that axis at the same place and
  length as its inputs'; every array of ``args`` is split along ``axis`` (anything shared is closed
  over by ``fn``). The chunks run one after another in a ``fori_loop`` that writes each result into
  the output buffers in place (``dynamic_update_slice``): no stacked copy to transpose back.

  When ``chunk`` does not divide the length, the last chunk is shifted back to end at the last index
  and overlaps the one before it, instead of padding: the overlapped indices are computed twice and
  written twice with the same values, and no padded copy of the (whole-clip) inputs is made.
  ``chunk <= 0`` or ``chunk >= length``: one call of ``fn`` on everything.
  """
  size = args[0].shape[axis]
  if chunk <= 0 or chunk >= size:
    return fn(*args)
  n = -(-size // chunk)

  chunk_args = [jax.ShapeDtypeStruct(a.shape[:axis] + (chunk,) + a.shape[axis + 1 :], a.dtype) for a in args]
  shapes = jax.eval_shape(fn, *chunk_args)

  def body(i, out):
    # The barrier makes this chunk's inputs depend on the previous chunk's results: XLA (GPU) may
    # unroll a loop with a small trip count, and its scheduler would then be free to run the chunks'
    # independent work side by side, keeping every chunk's intermediates alive at once.
    out, xs = jax.lax.optimization_barrier((out, list(args)))
    start = jnp.minimum(i * chunk, size - chunk)
    y = fn(*[jax.lax.dynamic_slice_in_dim(a, start, chunk, axis) for a in xs])
    return jax.tree.map(lambda o, v: jax.lax.dynamic_update_slice_in_dim(o, v, start, axis), out, y)

  # The output buffers are zeros computed from an input value (0 * x, not folded for floats), so they
  # cannot be allocated before the inputs exist: a constant broadcast has no operands, and a scheduler
  # that places it early (at the program start, say) would keep the whole-clip outputs of every
  # chunked loop of a UNet alive at once. Every index is overwritten, so a non-finite value is harmless.
  zero = 0 * jax.lax.index_in_dim(args[0].reshape(-1), 0, keepdims=False)
  out = jax.tree.map(lambda s: jnp.full(s.shape[:axis] + (size,) + s.shape[axis + 1 :], zero, s.dtype), shapes)
  return jax.lax.fori_loop(0, n, body, out)


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
    kernel_impl: str = "jax",
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    self.impl = attention_impl
    self.norm = GroupNorm(ch, groups, 1e-6, dtype=dtype, param_dtype=param_dtype)
    self.proj_in = nnx.Linear(ch, inner, **kw)
    self.transformer_blocks = nnx.List(
      [BasicTransformerBlock(inner, heads, dim_head, context_dim, self_only=False, kernel_impl=kernel_impl, **kw)]
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
  from its channels; its Conv1d projections are stored as Linear. Everything runs on the frames-major
  tokens ``[B, T, H*W, C]`` (a reshape of the activations): the attention over frames takes that
  layout as it is (see ``layers.attention``), so no transpose goes in or out.
  """

  def __init__(
    self,
    ch: int,
    heads: int,
    dim_head: int,
    groups: int,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    attention_impl: str = "xla",
    kernel_impl: str = "jax",
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    self.impl, self.kernel_impl, self.dim_head = attention_impl, kernel_impl, dim_head
    self.norm = GroupNorm(ch, groups, 1e-6, dtype=dtype, param_dtype=param_dtype)
    self.proj_in = nnx.Linear(ch, inner, **kw)
    self.transformer_blocks = nnx.List(
      [BasicTransformerBlock(inner, heads, dim_head, None, self_only=True, kernel_impl=kernel_impl, **kw)]
    )
    self.proj_out = nnx.Linear(inner, ch, **kw)

  def __call__(self, x: jax.Array, t: jax.Array, frames: FrameContext, *, frame_chunk: int = 0) -> jax.Array:
    """x: [B, T, H, W, C] local frames; t: [B] timesteps (dual-scope phase).

    ``frame_chunk`` C > 0: everything after the GroupNorm statistics (which span the clip and are
    taken once) runs over chunks of spatial positions, about C frames' worth of tokens each
    (``ceil(T / C)`` chunks, at most one per position): attention is over frames at each position, so
    positions are independent, and proj_in, the LayerNorms, the 8x-wide GEGLU hidden and proj_out only
    exist for one chunk at a time. The attention's collectives (halos, global frames) then run once
    per chunk, on that chunk's positions.
    """
    b, tl, hh, ww, c = x.shape
    m = hh * ww
    chunks = min(-(-tl // frame_chunk), m) if frame_chunk > 0 else 1
    if chunks > 1:
      return self._chunked(x, t, frames, -(-m // chunks))
    h = self.norm(x, axes=(1, 2, 3), sum_fn=frames.sum_frames)  # statistics over the clip
    h = self._mix_frames(h.reshape(b, tl, m, c), t, frames)
    return x + h.reshape(x.shape)

  def _mix_frames(self, h: jax.Array, t: jax.Array, frames: FrameContext) -> jax.Array:
    """h: [B, T, M, C] normalised tokens of M positions -> [B, T, M, C] (proj_in, block, proj_out)."""
    h = self.proj_in(h)
    window_kernel = self._window_kernel(frames, h.shape[1])
    zero_key = not window_kernel and uses_zero_key(frames, h.shape[1])

    def self_fn(q, k, v):  # [B, T, M, heads, d] (k, v: [B, T+1, ...] with the zero frame)
      if window_kernel:
        interpret = attention_lib.TEMPORAL_KERNEL == "interpret"
        return dual_scope_attention_kernel(q, k, v, t, frames, interpret=interpret)
      if zero_key:
        return dual_scope_attention_zero_key(q, k, v, t, frames, implementation=self.impl)
      return temporal_attention(q, k, v, t, frames, implementation=self.impl)

    for blk in self.transformer_blocks:
      h = blk(h, None, self_fn, zero_token=zero_key)
    return self.proj_out(h)

  def _window_kernel(self, frames: FrameContext, local_frames: int) -> bool:
    """Whether the dual-scope attention runs through the Pallas window kernel (``attention.TEMPORAL_KERNEL``):
    with 'on', where the kernels run (GPU) and cuDNN's fused attention would (16-bit, compute capability 8.0+);
    with 'merged', there and only in its merged form (one block of frames on the device)."""
    mode = attention_lib.TEMPORAL_KERNEL
    if mode not in ("off", "on", "merged", "interpret"):
      raise ValueError(f"attention.TEMPORAL_KERNEL={mode!r}, expected 'off', 'on', 'merged' or 'interpret'")
    plan = window_kernel_plan(frames, local_frames, self.dim_head)
    if mode == "off" or plan is None or (mode == "merged" and plan != "merged"):
      return False
    return mode == "interpret" or (self.kernel_impl == "pallas" and self.impl == "cudnn")

  def _chunked(self, x: jax.Array, t: jax.Array, frames: FrameContext, positions: int) -> jax.Array:
    """The same as the plain path, ``positions`` spatial positions at a time (see ``__call__``)."""
    b, tl, hh, ww, c = x.shape
    # Statistics once over the whole clip (psum over devices included), outside the loop:
    # GroupNorm.__call__ would take them from the chunk it normalises.
    mean, var = group_stats(x, self.norm.num_groups, (1, 2, 3), frames.sum_frames)  # [B, 1, 1, 1, G, 1]
    mean, var = mean[:, 0], var[:, 0]  # [B, 1, 1, G, 1], for chunks [B, T, P, C]
    inv = jax.lax.rsqrt(var + self.norm.epsilon)

    def body(xc):  # [B, T, P, C]: P positions of every local frame
      return xc + self._mix_frames(self.norm.normalize(xc, mean, inv), t, frames)

    y = map_chunks(body, [x.reshape(b, tl, hh * ww, c)], axis=2, chunk=positions)  # [B, T, HW, C]
    return y.reshape(x.shape)
