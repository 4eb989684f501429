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
from vinf_jax.layers import kernels
from vinf_jax.layers.attention import resolve_implementation
from vinf_jax.layers.embeddings import TimestepMLP, guidance_embedding, timestep_embedding
from vinf_jax.layers.norm import GroupNorm
from vinf_jax.layers.resnet import Downsample, ResBlock, Upsample, conv2d
from vinf_jax.layers.transformers import SpatialTransformer, TemporalTransformer, map_chunks
from vinf_jax.models import abstract_model
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
    tkw = dict(attention_impl=impl, kernel_impl=kernels.resolve(cfg.kernel_impl), **kw)

    def st(ch):
      return SpatialTransformer(ch, ch // hc, hc, cfg.context_dim, g, **tkw)

    def tt(ch):
      return TemporalTransformer(ch, ch // hc, hc, g, **tkw)

    self.time_embed = TimestepMLP(mc, ed, **kw)
    self.fps_embedding = TimestepMLP(mc, ed, **kw) if cfg.fps_cond else None
    # T2V-Turbo: the guidance (and v2's motion) embedding, added to the timestep embedding before time_embed
    wd = cfg.time_cond_proj_dim
    self.time_cond_proj = nnx.Linear(wd, mc, use_bias=False, **kw) if wd else None
    self.motion_cond_proj = nnx.Linear(wd, mc, use_bias=False, **kw) if cfg.motion_cond else None
    self.combine_proj = nnx.Linear(2 * mc, mc, use_bias=False, **kw) if cfg.motion_cond else None
    self.init_attn = nnx.List([TemporalTransformer(mc, cfg.init_attn_heads, hc, g, **tkw)])

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
    guidance: jax.Array | None = None,
    motion: jax.Array | None = None,
    frames: FrameContext = FrameContext(),
    frame_chunk: int = 0,
  ) -> jax.Array:
    """Predict the noise.

    ``frame_chunk`` bounds the activation memory. With C > 0 every run of consecutive per-frame
    layers (conv_in; a ResBlock's 2D part, with the skip concatenation and a Down/Upsample next to
    it; a SpatialTransformer; the output norm and conv) runs over chunks of C local frames, one after
    another, and the temporal transformers run over chunks of spatial positions of about C frames'
    worth of tokens (their clip-wide GroupNorm statistics taken once beforehand); the temporal conv
    blocks run on the whole local clip. The result is the same up to float rounding (frames are
    independent in the spatial layers, positions in the attention over frames). When C does not
    divide the frames (or the positions), the last chunk overlaps the one before it, so up to C-1
    frames are computed twice per chunked run; C >= T is the same as 0. Smaller chunks mean less
    memory but smaller, slower matmuls and (with several devices) one set of temporal-attention
    collectives per chunk; 0 is the unchunked program.

    What stays per frame after chunking (full-size model, latent 40x64, batch 2, bfloat16, i.e.
    4 bytes per value of one frame; arithmetic, not measured): the 12 skip connections, alive from
    the encoder until their decoder block, hold 3 x 2560 x 320 + 640 x 320 + 2 x 640 x 640 +
    160 x 640 + 2 x 160 x 1280 + 3 x 40 x 1280 = 4,147,200 values per frame (16.6 MB; the three
    level-0 ones, 2,457,600 values, until the last blocks). On top of them the whole-clip working set
    of the widest level (2560 x 320 = 819,200 values, 3.3 MB per frame and tensor): the block's input
    and output, and in a temporal conv block its residual input, the normalised activation and each
    stage's output, about five such tensors (16.4 MB). So at most ~33 MB per frame (~38 GB at 1152
    frames; the actual peak, in the first level-0 decoder block with two level-0 skips alive, ~23 MB
    per frame, ~26 GB), plus one chunk's intermediates, which do not grow with T: a spatial
    transformer at level 0 has a GEGLU hidden of 2560 tokens x 2560 values (26 MB per frame of the
    chunk) alone. Without chunking those intermediates scale with all T frames: XLA's temporary
    buffers for the unchunked forward at 1152 frames (dual-scope attention) are 76.6 GiB, 68 MiB per
    frame (compiled on an H100, jax 0.11.2), which leaves no room for weights and latents on 80 GB;
    with ``frame_chunk=16`` they are 4.69 GiB at 256 frames, 18.8 MiB per frame (same card and jax).

    Args:
      x: ``[B, T, H, W, C_in]`` noisy latents of the local frames (H, W divisible by 2**(levels-1)).
      t: ``[B]`` or scalar diffusion timesteps (0..999).
      context: ``[B, S, context_dim]`` text, or ``[B, T, S, context_dim]`` one text per frame.
      fps: ``[B]`` or scalar frame-rate conditioning (required when ``cfg.fps_cond``).
      guidance: ``[B]`` or scalar guidance scale w of a T2V-Turbo UNet (required when it has
        ``time_cond_proj``, refused otherwise).
      motion: ``[B]`` or scalar motion scale of a T2V-Turbo-v2 UNet (required when ``cfg.motion_cond``).
      frames: how the local frames sit in the video (default: all of it on this device).
      frame_chunk: local frames per chunk of the per-frame layers (0: no chunking); static.

    Returns:
      ``[B, T, H, W, C_out]`` float32.
    """
    if isinstance(frame_chunk, bool) or not isinstance(frame_chunk, int) or frame_chunk < 0:
      raise ValueError(f"frame_chunk={frame_chunk!r}, expected an int >= 0 (0: no chunking)")
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    dtype = to_dtype(self.cfg.dtype)
    emb = self._embedding(t, fps, guidance, motion)
    context = context.astype(dtype)
    steps = self._steps(emb, t, frames, frame_chunk)
    h = _run(steps, x.astype(dtype), context, frame_chunk)
    return h.astype(jnp.float32)

  def _embedding(self, t: jax.Array, fps, guidance, motion) -> jax.Array:
    """The ResBlocks' conditioning ``[B, time_embed_dim]``: the timestep (``[B]`` float32) through time_embed,
    with T2V-Turbo's guidance (and motion) embedding added before it and the fps embedding after."""
    cfg = self.cfg
    b = t.shape[0]
    dtype = to_dtype(cfg.dtype)
    emb = timestep_embedding(t, cfg.model_channels).astype(dtype)
    if (guidance is None) != (self.time_cond_proj is None):
      raise ValueError(
        "this UNet has a guidance embedding (time_cond_proj): pass guidance"
        if guidance is None
        else "guidance= is for T2V-Turbo UNets (time_cond_proj_dim > 0); this one has none"
      )
    if (motion is None) != (self.motion_cond_proj is None):
      raise ValueError(
        "this UNet has motion conditioning (motion_cond): pass motion"
        if motion is None
        else "motion= is for T2V-Turbo-v2 UNets (motion_cond); this one has none"
      )
    if self.time_cond_proj is not None:
      wd = cfg.time_cond_proj_dim
      w = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
      cond = self.time_cond_proj(guidance_embedding(w, wd).astype(dtype))
      if self.motion_cond_proj is not None:
        m = jnp.broadcast_to(jnp.asarray(motion, jnp.float32), (b,))
        m_emb = self.motion_cond_proj(guidance_embedding(m, wd).astype(dtype))
        cond = self.combine_proj(jnp.concatenate([cond, m_emb], axis=-1))
      emb = emb + cond
    emb = self.time_embed(emb)
    if self.fps_embedding is not None:
      if fps is None:
        raise ValueError("this UNet is fps-conditioned (fps_cond=True): pass fps")
      fps = jnp.broadcast_to(jnp.asarray(fps, jnp.float32), (b,))
      emb = emb + self.fps_embedding(timestep_embedding(fps, cfg.model_channels).astype(dtype))
    return emb

  def _steps(self, emb, t, frames, frame_chunk) -> list[tuple[str, object]]:
    """The forward pass as a flat list of ``(kind, fn)``: kind 'spatial' (``fn(h, context)``, per
    frame), 'temporal' (``fn(h)``, whole local clip), 'push' (h becomes a skip) or 'concat' (the last
    skip is concatenated to h along channels; per frame)."""

    # Default arguments bind each layer (a plain closure would see the loop's last one).
    def block(layers):
      out = []
      for layer in layers:
        if isinstance(layer, ResBlock):
          out.append(("spatial", lambda h, ctx, r=layer: r.spatial(h, emb)))
          out.append(("temporal", lambda h, r=layer: r.temopral_conv(h, frames, frame_chunk=frame_chunk)))
        elif isinstance(layer, SpatialTransformer):
          out.append(("spatial", lambda h, ctx, st=layer: st(h, ctx)))
        elif isinstance(layer, TemporalTransformer):
          out.append(("temporal", lambda h, tt=layer: tt(h, t, frames, frame_chunk=frame_chunk)))
        else:  # Downsample / Upsample
          out.append(("spatial", lambda h, ctx, f=layer: f(h)))
      return out

    push, concat = ("push", None), ("concat", None)
    steps = [
      ("spatial", lambda h, ctx: conv2d(self.input_blocks[0][0], h)),
      ("temporal", lambda h: self.init_attn[0](h, t, frames, frame_chunk=frame_chunk)),
      push,  # the first skip is taken after init_attn
    ]
    for blk in list(self.input_blocks)[1:]:
      steps += [*block(blk), push]
    steps += block(self.middle_block)
    for blk in self.output_blocks:
      steps += [concat, *block(blk)]
    steps.append(("spatial", lambda h, ctx: conv2d(self.out_conv, jax.nn.silu(self.out_norm(h, axes=(2, 3))))))
    return steps


def _run(steps, h: jax.Array, context: jax.Array, frame_chunk: int) -> jax.Array:
  """Run the steps of :meth:`UNet3D._steps`; each maximal run of non-temporal steps is one segment,
  chunked over frames (see :func:`_segment`)."""
  skips: list[jax.Array] = []
  i = 0
  while i < len(steps):
    if steps[i][0] == "temporal":
      h = steps[i][1](h)
      i += 1
      continue
    j = i
    while j < len(steps) and steps[j][0] != "temporal":
      j += 1
    h, skips = _segment(steps[i:j], h, skips, context, frame_chunk)
    i = j
  return h


def _segment(steps, h, skips, context, frame_chunk):
  """Per-frame steps over chunks of ``frame_chunk`` frames (all at once for 0).

  The chunks take h, the skips the segment concatenates and a per-frame context along the frame
  axis, and return h and the skips the segment pushes; a shared ``[B, S, C]`` context is the same
  for every chunk.
  """
  skips = list(skips)
  while steps and steps[0][0] == "push":  # h itself is the skip: no chunked copy of it
    skips.append(h)
    steps = steps[1:]
  if not steps:
    return h, skips
  taken, depth = 0, 0  # skips popped from the stack before the segment / pushed inside it
  for kind, _ in steps:
    if kind == "push":
      depth += 1
    elif kind == "concat":
      depth, taken = (depth - 1, taken) if depth else (depth, taken + 1)
  keep, popped = skips[: len(skips) - taken], skips[len(skips) - taken :]
  per_frame = context.ndim == 4  # [B, T, S, C]: split along frames with h

  def run(h, *args):  # h: [B, T', H, W, C] for T' frames (all, or one chunk)
    ctx, stack = (args[0], list(args[1:])) if per_frame else (context, list(args))
    for kind, fn in steps:
      if kind == "spatial":
        h = fn(h, ctx)
      elif kind == "push":
        stack.append(h)
      else:
        h = jnp.concatenate([h, stack.pop()], axis=-1)
    return h, stack  # stack: the skips pushed here

  args = [h, *([context] if per_frame else []), *popped]
  h, pushed = map_chunks(run, args, axis=1, chunk=frame_chunk)
  return h, keep + list(pushed)


def build(cfg: UNetConfig, seed: int = 0) -> UNet3D:
  """A UNet with random weights (tests, the tiny demo, benchmarks)."""
  return UNet3D(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: UNetConfig) -> UNet3D:
  """The UNet with ShapeDtypeStructs instead of arrays: nothing is allocated."""
  return abstract_model(UNet3D, cfg)
