"""VideoCrafter2's text-to-video 3D UNet (``openaimodel3d.UNetModel``) in Flax NNX.

Layout: the latent is ``[B, T, H, W, C]`` (channels last; T = the frames this device holds). Module
and attribute names follow the PyTorch modules, so the conversion table (``convert/unet_table.py``)
reads as a renaming: ``input_blocks[n][i]`` is ``input_blocks.n.i``, ``init_attn[0]`` is
``init_attn.0`` and so on.

Dtype policy: activations and matmuls in ``cfg.dtype`` (bfloat16 on GPU, float32 on CPU); GroupNorm
statistics, the sinusoidal embeddings and softmax in float32; the output epsilon in float32.

Frames: every temporal layer gets its frame context from a :class:`vinf_jax.parallel.FrameContext`
passed as ``frames``; the default is one device holding the whole clip (plain VideoCrafter2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vinf_jax.config import UNetConfig, to_dtype
from vinf_jax.layers.attention import resolve_implementation
from vinf_jax.layers.embeddings import TimestepMLP, timestep_embedding
from vinf_jax.layers.norm import GroupNorm
from vinf_jax.layers.resnet import Downsample, ResBlock, Upsample, conv2d
from vinf_jax.layers.transformers import SpatialTransformer, TemporalTransformer
from vinf_jax.parallel import FrameContext


class UNet3D(nnx.Module):
  """The epsilon-prediction UNet. See the module docstring for layout and dtypes."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dtype, pdt = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdt, rngs=rngs)
    mc, hc, g, ed = cfg.model_channels, cfg.num_head_channels, cfg.num_groups, cfg.time_embed_dim
    impl = resolve_implementation(cfg.attention_impl, dtype)

    def st(ch):
      return SpatialTransformer(ch, ch // hc, hc, cfg.context_dim, g, attention_impl=impl, **kw)

    def tt(ch):
      return TemporalTransformer(ch, ch // hc, hc, g, **kw)

    self.time_embed = TimestepMLP(mc, ed, **kw)
    self.fps_embedding = TimestepMLP(mc, ed, **kw) if cfg.fps_cond else None
    self.init_attn = nnx.List([TemporalTransformer(mc, cfg.init_attn_heads, hc, g, **kw)])

    blocks = [[nnx.Conv(cfg.in_channels, mc, (3, 3), padding=((1, 1), (1, 1)), **kw)]]
    chans, ch = [mc], mc
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
      for _ in range(cfg.num_res_blocks):
        layers = [ResBlock(ch, mult * mc, ed, g, **kw)]
        ch = mult * mc
        if level in cfg.attention_levels:
          layers += [st(ch), tt(ch)]
        blocks.append(layers)
        chans.append(ch)
      if level != last:
        blocks.append([Downsample(ch, **kw)])
        chans.append(ch)
    self.input_blocks = nnx.List([nnx.List(b) for b in blocks])
    self.middle_block = nnx.List([ResBlock(ch, ch, ed, g, **kw), st(ch), tt(ch), ResBlock(ch, ch, ed, g, **kw)])

    blocks = []
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
      for i in range(cfg.num_res_blocks + 1):
        layers = [ResBlock(ch + chans.pop(), mc * mult, ed, g, **kw)]
        ch = mc * mult
        if level in cfg.attention_levels:
          layers += [st(ch), tt(ch)]
        if level and i == cfg.num_res_blocks:
          layers.append(Upsample(ch, **kw))
        blocks.append(layers)
    self.output_blocks = nnx.List([nnx.List(b) for b in blocks])
    self.out_norm = GroupNorm(ch, g, 1e-5, dtype=dtype, param_dtype=pdt)  # out.0
    self.out_conv = nnx.Conv(ch, cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), **kw)  # out.2

  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    context: jax.Array,
    fps: jax.Array | None = None,
    *,
    frames: FrameContext = FrameContext(),
  ) -> jax.Array:
    """Predict the noise.

    Args:
      x: ``[B, T, H, W, C_in]`` noisy latents of the local frames (H, W divisible by 2**(levels-1)).
      t: ``[B]`` or scalar diffusion timesteps (0..999).
      context: ``[B, S, context_dim]`` text, or ``[B, T, S, context_dim]`` one text per frame.
      fps: ``[B]`` or scalar frame-rate conditioning (required when ``cfg.fps_cond``).
      frames: how the local frames sit in the video (default: all of it on this device).

    Returns:
      ``[B, T, H, W, C_out]`` float32.
    """
    cfg = self.cfg
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    dtype = to_dtype(cfg.dtype)
    emb = self.time_embed(timestep_embedding(t, cfg.model_channels).astype(dtype))
    if self.fps_embedding is not None:
      if fps is None:
        raise ValueError("this UNet is fps-conditioned (fps_cond=True): pass fps")
      fps = jnp.broadcast_to(jnp.asarray(fps, jnp.float32), (b,))
      emb = emb + self.fps_embedding(timestep_embedding(fps, cfg.model_channels).astype(dtype))
    context = context.astype(dtype)

    h = conv2d(self.input_blocks[0][0], x.astype(dtype))
    h = self.init_attn[0](h, t, frames)
    skips = [h]  # the first skip is taken after init_attn
    for blk in list(self.input_blocks)[1:]:
      h = self._block(blk, h, emb, context, t, frames)
      skips.append(h)
    h = self._block(self.middle_block, h, emb, context, t, frames)
    for blk in self.output_blocks:
      h = self._block(blk, jnp.concatenate([h, skips.pop()], axis=-1), emb, context, t, frames)
    h = conv2d(self.out_conv, jax.nn.silu(self.out_norm(h, axes=(2, 3))))
    return h.astype(jnp.float32)

  @staticmethod
  def _block(layers, h, emb, context, t, frames):
    for layer in layers:
      if isinstance(layer, ResBlock):
        h = layer(h, emb, frames)
      elif isinstance(layer, SpatialTransformer):
        h = layer(h, context)
      elif isinstance(layer, TemporalTransformer):
        h = layer(h, t, frames)
      else:  # Downsample / Upsample
        h = layer(h)
    return h


def build(cfg: UNetConfig, seed: int = 0) -> UNet3D:
  """A UNet with random weights (tests, the tiny demo, benchmarks)."""
  return UNet3D(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: UNetConfig) -> UNet3D:
  """The UNet with ShapeDtypeStructs instead of arrays: nothing is allocated."""
  return nnx.eval_shape(lambda: UNet3D(cfg, rngs=nnx.Rngs(0)))


def param_count(model: nnx.Module) -> int:
  return sum(int(jnp.size(v)) if hasattr(v, "size") else 0 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
