"""ResBlock with its temporal conv block, and the spatial down/upsampling convs.

Activations are ``[B, T, H, W, C]`` (channels last, frames second); 2D convs fold T into the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vinf_jax.layers.norm import GroupNorm, group_stats
from vinf_jax.layers.transformers import map_chunks
from vinf_jax.parallel import FrameContext

# The temporal conv block stacks four kernel-3 convs: a receptive field of +-4 frames.
TEMPORAL_CONV_HALO = 4


def conv2d(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """Apply a 2D conv frame by frame: [B, T, H, W, C] -> [B, T, H', W', C']."""
  b, t = x.shape[:2]
  y = conv(x.reshape(b * t, *x.shape[2:]))  # [B*T, H, W, C]
  return y.reshape(b, t, *y.shape[1:])


class TemporalConv(nnx.Module):
  """Conv3d with kernel (3, 1, 1): a kernel-3 conv along frames, per spatial position."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    bound = 1.0 / np.sqrt(3 * channels)
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (3, channels, channels), param_dtype, -bound, bound))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array, padding: int) -> jax.Array:
    """x: [B, T, H, W, C] -> [B, T + 2*padding - 2, H, W, C] (zero padding along T)."""
    b, t, h, w, c = x.shape
    y = jax.lax.conv_general_dilated(
      x.reshape(b, t, h * w, c).astype(self.dtype),  # frames as "height", pixels as "width"
      self.kernel[...][:, None].astype(self.dtype),  # [3, 1, C, C] HWIO
      window_strides=(1, 1),
      padding=((padding, padding), (0, 0)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(b, y.shape[1], h, w, c)


class TemporalConvStage(nnx.Module):
  """GroupNorm (eps 1e-5, over the whole clip) -> SiLU -> (Dropout) -> TemporalConv."""

  def __init__(self, channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.norm = GroupNorm(channels, groups, 1e-5, dtype=dtype, param_dtype=param_dtype)
    self.conv = TemporalConv(channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class TemporalConvBlock(nnx.Module):
  """``temopral_conv`` (sic: the checkpoint's spelling): four stages plus the residual."""

  def __init__(self, channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = TemporalConvStage(channels, groups, **kw)
    self.conv2 = TemporalConvStage(channels, groups, **kw)
    self.conv3 = TemporalConvStage(channels, groups, **kw)
    self.conv4 = TemporalConvStage(channels, groups, **kw)

  def __call__(self, x: jax.Array, frames: FrameContext, *, frame_chunk: int = 0) -> jax.Array:
    """x: [B, T, H, W, C] local frames -> same.

    ``frame_chunk`` C > 0: each stage takes its clip-wide statistics first, then normalises, activates and
    convolves chunks of spatial positions (``ceil(T / C)`` chunks, as the temporal transformers do) one after
    another: the conv is along frames, so positions are independent. Every conv then has about C frames'
    worth of positions whatever T is, so neither the normalised activation of the whole clip nor a conv of
    the whole clip (whose autotuning grows with it) exists; the result is the same.
    """
    stages = (self.conv1, self.conv2, self.conv3, self.conv4)
    b, t, hh, ww, c = x.shape
    m = hh * ww
    chunks = min(-(-t // frame_chunk), m) if frame_chunk > 0 else 1
    positions = -(-m // chunks)

    def stage(s, h, stats_from, padding, mask=None, sum_fn=None):
      # h: [B, L, H, W, C] -> [B, L + 2 * padding - 2, H, W, C]
      mean, var = group_stats(h if stats_from is None else stats_from, s.norm.num_groups, (1, 2, 3), sum_fn)
      mean, inv = mean[:, 0], jax.lax.rsqrt(var + s.norm.epsilon)[:, 0]  # [B, 1, 1, G, 1], for [B, L, P, C]

      def body(hc):  # [B, L, P, C]: P positions of every frame of the window
        a = jax.nn.silu(s.norm.normalize(hc, mean, inv))
        if mask is not None:
          a = a * mask[:, :, :, 0, 0, None].astype(a.dtype)
        return s.conv(a[:, :, :, None], padding=padding)[:, :, :, 0]

      flat = h.reshape(b, h.shape[1], m, c)
      return map_chunks(body, [flat], axis=2, chunk=positions if chunks > 1 else 0).reshape(b, -1, hh, ww, c)

    if frames.axis_name is None and frames.exact_norm:
      # One device holds the whole clip: zero padding and clip statistics, as VideoCrafter2.
      h = x
      for s in stages:
        h = stage(s, h, None, padding=1)
      return x + h

    halo = TEMPORAL_CONV_HALO
    left, right = frames.halo(x, halo)
    h = jnp.concatenate([left, x, right], axis=1)  # [B, T+8, H, W, C]
    if not frames.exact_norm:
      # The official plugin: statistics over the halo-padded window (zeros at the video's ends
      # included), zero padding inside the window, crop the halo.
      for s in stages:
        h = stage(s, h, None, padding=1)
      return x + h[:, halo : halo + t]

    # Exact: each stage normalises with statistics of the real frames (own frames, summed over
    # devices), zeroes what lies beyond the video's ends (= the zero padding of one device), and
    # shrinks the window by one frame a side, so the halo is used up exactly after four stages.
    n = frames.total_frames(t)
    pos = frames.frame_offset(t) + jnp.arange(-halo, t + halo)
    valid = ((pos >= 0) & (pos < n))[None, :, None, None, None]
    for k, s in enumerate(stages):
      own = h[:, halo - k : halo - k + t]
      h = stage(s, h, own, padding=0, mask=valid[:, k : k + h.shape[1]], sum_fn=frames.sum_frames)
    return x + h


class ResBlock(nnx.Module):
  """VideoCrafter2 ResBlock: in_layers, emb_layers, out_layers, skip, then the temporal conv block."""

  def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_norm = GroupNorm(in_ch, groups, 1e-5, dtype=dtype, param_dtype=param_dtype)  # in_layers.0
    self.in_conv = nnx.Conv(in_ch, out_ch, (3, 3), padding=((1, 1), (1, 1)), **kw)  # in_layers.2
    self.emb_proj = nnx.Linear(emb_dim, out_ch, **kw)  # emb_layers.1
    self.out_norm = GroupNorm(out_ch, groups, 1e-5, dtype=dtype, param_dtype=param_dtype)  # out_layers.0
    self.out_conv = nnx.Conv(out_ch, out_ch, (3, 3), padding=((1, 1), (1, 1)), **kw)  # out_layers.3
    self.skip_connection = nnx.Conv(in_ch, out_ch, (1, 1), **kw) if in_ch != out_ch else None
    self.temopral_conv = TemporalConvBlock(out_ch, groups, **kw)  # sic

  def __call__(self, x: jax.Array, emb: jax.Array, frames: FrameContext) -> jax.Array:
    """x: [B, T, H, W, Cin], emb: [B, E] -> [B, T, H, W, Cout]."""
    return self.temopral_conv(self.spatial(x, emb), frames)

  def spatial(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """The per-frame 2D part (everything before the temporal conv block): any subset of frames may
    go through it on its own, which is what the UNet's ``frame_chunk`` relies on.

    x: [B, T, H, W, Cin], emb: [B, E] -> [B, T, H, W, Cout].
    """
    h = conv2d(self.in_conv, jax.nn.silu(self.in_norm(x, axes=(2, 3))))  # per-frame statistics
    h = h + self.emb_proj(jax.nn.silu(emb))[:, None, None, None, :]
    h = conv2d(self.out_conv, jax.nn.silu(self.out_norm(h, axes=(2, 3))))
    skip = x if self.skip_connection is None else conv2d(self.skip_connection, x)
    return skip + h


class Downsample(nnx.Module):
  """3x3 stride-2 conv with symmetric padding 1 (``.op``)."""

  def __init__(self, ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.op = nnx.Conv(
      ch, ch, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return conv2d(self.op, x)


class Upsample(nnx.Module):
  """Nearest x2 on H and W, then a 3x3 conv (``.conv``)."""

  def __init__(self, ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = nnx.Conv(ch, ch, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    return conv2d(self.conv, x)
