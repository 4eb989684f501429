"""VideoCrafter2's KL-f8 autoencoder (``first_stage_model``, LDM ``AutoencoderKL``) in Flax NNX.

Layout: videos are ``[B, T, H, W, C]`` (channels last). The VAE is a 2D model run frame by frame
(``encoder_type`` "2d", architecture notes section 2), so every layer sees the frames folded into the
batch, ``[B*T, H, W, C]``, with the frame index fastest.

Names: attributes follow the LDM modules (``lvdm/modules/networks/ae_modules.py``), so a flax path is
the checkpoint key with slashes: ``encoder/down/0/block/1/norm1/scale`` is
``encoder.down.0.block.1.norm1.weight``. ``decoder.up[0]`` is the full-resolution level and
``up[-1]`` the lowest, as LDM stores them (``self.up.insert(0, ...)``); they run lowest first. The
attention's ``q/k/v/proj_out`` are 1x1 Conv2d in the checkpoint and Linear here (a 1x1 conv on tokens
is a matmul); ``convert/vae_table.py`` holds the key tables (LDM and diffusers).

Dtype policy: convs and matmuls in ``cfg.dtype``; GroupNorm statistics, the attention softmax, the
posterior (mean, logvar, sampling) and the returned latents and frames in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vinf_jax.config import VAEConfig, to_dtype
from vinf_jax.layers.attention import attention
from vinf_jax.layers.norm import GroupNorm
from vinf_jax.models import abstract_model

# Every GroupNorm of the LDM VAE uses eps 1e-6 (architecture notes, section 4.4); PyTorch's default
# would be 1e-5.
VAE_NORM_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range before exp().
LOGVAR_RANGE = (-30.0, 20.0)


def _conv3x3(cin: int, cout: int, **kw) -> nnx.Conv:
  return nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), **kw)


def _conv1x1(cin: int, cout: int, **kw) -> nnx.Conv:
  return nnx.Conv(cin, cout, (1, 1), padding=((0, 0), (0, 0)), **kw)


def _norm(ch: int, groups: int, dtype, param_dtype) -> GroupNorm:
  return GroupNorm(ch, groups, VAE_NORM_EPS, dtype=dtype, param_dtype=param_dtype)


class ResnetBlock(nnx.Module):
  """norm1, swish, conv1, norm2, swish, (dropout 0), conv2, plus ``nin_shortcut`` when channels change.

  There is no time embedding in the VAE (temb_ch = 0), hence no ``temb_proj``.
  """

  def __init__(self, in_ch: int, out_ch: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _norm(in_ch, groups, dtype, param_dtype)
    self.conv1 = _conv3x3(in_ch, out_ch, **kw)
    self.norm2 = _norm(out_ch, groups, dtype, param_dtype)
    self.conv2 = _conv3x3(out_ch, out_ch, **kw)
    self.nin_shortcut = _conv1x1(in_ch, out_ch, **kw) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, Cin] -> [N, H, W, Cout]."""
    h = self.conv1(jax.nn.silu(self.norm1(x, axes=(1, 2))))
    h = self.conv2(jax.nn.silu(self.norm2(h, axes=(1, 2))))
    skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return skip + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over the h*w pixels of a frame, with a residual (``mid.attn_1``)."""

  def __init__(self, ch: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = _norm(ch, groups, dtype, param_dtype)
    self.q = nnx.Linear(ch, ch, **kw)  # Conv2d 1x1 in the checkpoint
    self.k = nnx.Linear(ch, ch, **kw)
    self.v = nnx.Linear(ch, ch, **kw)
    self.proj_out = nnx.Linear(ch, ch, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C] -> same."""
    n, h, w, c = x.shape
    t = self.norm(x, axes=(1, 2)).reshape(n, h * w, c)  # [N, h*w, C]
    q, k, v = (f(t)[:, :, None, :] for f in (self.q, self.k, self.v))  # [N, h*w, 1 head, C]
    # XLA's path keeps the logits and softmax in float32 for 16-bit inputs; cuDNN's fused kernels do
    # not take a head dim of 512, so this attention is always XLA's. Scale 1/sqrt(C), as LDM.
    o = attention(q, k, v, implementation="xla")  # [N, h*w, 1, C]
    return x + self.proj_out(o[:, :, 0, :]).reshape(n, h, w, c)


class Downsample(nnx.Module):
  """Pad (0, 1) on the right and bottom only, then a 3x3 stride-2 conv without padding (``.conv``)."""

  def __init__(self, ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = nnx.Conv(
      ch, ch, (3, 3), strides=(2, 2), padding=((0, 0), (0, 0)), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C] -> [N, H // 2, W // 2, C]."""
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest x2 on H and W, then a 3x3 conv with padding 1 (``.conv``)."""

  def __init__(self, ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = _conv3x3(ch, ch, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C] -> [N, 2H, 2W, C]."""
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Mid(nnx.Module):
  """``mid``: block_1, attn_1, block_2 at the lowest resolution."""

  def __init__(self, ch: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.block_1 = ResnetBlock(ch, ch, groups, **kw)
    self.attn_1 = AttnBlock(ch, groups, **kw)
    self.block_2 = ResnetBlock(ch, ch, groups, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nnx.Module):
  """``encoder.down.{i}``: ResnetBlocks (``block``), then ``downsample`` except at the last level.

  LDM's (empty, since attn_resolutions = []) ``attn`` list has no parameters and is left out.
  """

  def __init__(
    self, in_ch: int, out_ch: int, num_blocks: int, groups: int, downsample: bool, *, dtype, param_dtype, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.block = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, **kw) for j in range(num_blocks)])
    self.downsample = Downsample(out_ch, **kw) if downsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for blk in self.block:
      x = blk(x)
    return x if self.downsample is None else self.downsample(x)


class UpLevel(nnx.Module):
  """``decoder.up.{i}``: ResnetBlocks (``block``), then ``upsample`` except at the full-resolution level."""

  def __init__(
    self, in_ch: int, out_ch: int, num_blocks: int, groups: int, upsample: bool, *, dtype, param_dtype, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.block = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, **kw) for j in range(num_blocks)])
    self.upsample = Upsample(out_ch, **kw) if upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for blk in self.block:
      x = blk(x)
    return x if self.upsample is None else self.upsample(x)


class Encoder(nnx.Module):
  """Image [N, H, W, in_channels] -> moments [N, H/f, W/f, 2*z_channels] (double_z: mean and logvar)."""

  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    g, last = cfg.num_groups, len(cfg.ch_mult) - 1
    self.conv_in = _conv3x3(cfg.in_channels, cfg.ch, **kw)
    chans = [cfg.ch * m for m in cfg.ch_mult]
    ins = [cfg.ch] + chans[:-1]
    self.down = nnx.List(
      [DownLevel(ins[i], chans[i], cfg.num_res_blocks, g, i != last, **kw) for i in range(len(chans))]
    )
    self.mid = Mid(chans[-1], g, **kw)
    self.norm_out = _norm(chans[-1], g, dtype, param_dtype)
    self.conv_out = _conv3x3(chans[-1], 2 * cfg.z_channels, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h, axes=(1, 2))))


class Decoder(nnx.Module):
  """Latent [N, h, w, z_channels] -> image [N, h*f, w*f, out_channels]; levels run lowest first."""

  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    g = cfg.num_groups
    chans = [cfg.ch * m for m in cfg.ch_mult]
    self.conv_in = _conv3x3(cfg.z_channels, chans[-1], **kw)
    self.mid = Mid(chans[-1], g, **kw)
    # Level i takes the channels of level i+1 (the one run before it); the lowest takes mid's.
    ins = chans[1:] + [chans[-1]]
    self.up = nnx.List([UpLevel(ins[i], chans[i], cfg.num_res_blocks + 1, g, i != 0, **kw) for i in range(len(chans))])
    self.norm_out = _norm(chans[0], g, dtype, param_dtype)
    self.conv_out = _conv3x3(chans[0], cfg.out_channels, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = self.mid(self.conv_in(z))
    for level in reversed(list(self.up)):
      h = level(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h, axes=(1, 2))))


class AutoencoderKL(nnx.Module):
  """The KL autoencoder: ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder``.

  The public methods take and return videos (``[B, T, ...]``) and apply ``cfg.scale_factor``, so their
  latents are the ones the UNet sees.
  """

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dtype, pdt = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdt, rngs=rngs)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    self.quant_conv = _conv1x1(2 * cfg.z_channels, 2 * cfg.embed_dim, **kw)
    self.post_quant_conv = _conv1x1(cfg.embed_dim, cfg.z_channels, **kw)

  def posterior(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The diagonal Gaussian posterior, unscaled.

    Args:
      video: ``[B, T, H, W, in_channels]`` in [-1, 1].

    Returns:
      mean, logvar: ``[B, T, H/f, W/f, embed_dim]`` float32; logvar clamped to [-30, 20].
    """
    b, t = video.shape[:2]
    x = video.reshape(b * t, *video.shape[2:]).astype(to_dtype(self.cfg.dtype))  # [B*T, H, W, C]
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)  # [B*T, h, w, 2*embed_dim]
    mean, logvar = jnp.split(moments, 2, axis=-1)  # mean is the first half, as LDM's torch.chunk
    logvar = jnp.clip(logvar, *LOGVAR_RANGE)
    return mean.reshape(b, t, *mean.shape[1:]), logvar.reshape(b, t, *logvar.shape[1:])

  def encode(self, video: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """``scale_factor * z`` with z sampled from the posterior (``rng`` given) or its mean (``rng=None``).

    Args:
      video: ``[B, T, H, W, in_channels]`` in [-1, 1].
      rng: a PRNG key for ``posterior.sample()``, or None for the deterministic mean.

    Returns:
      ``[B, T, H/f, W/f, embed_dim]`` float32 latents as the UNet sees them.
    """
    mean, logvar = self.posterior(video)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
    return self.cfg.scale_factor * z

  def decode(self, latents: jax.Array) -> jax.Array:
    """Latents as the UNet sees them -> frames.

    Args:
      latents: ``[B, T, h, w, embed_dim]`` (divided by ``scale_factor`` here).

    Returns:
      ``[B, T, h*f, w*f, out_channels]`` float32, nominally in [-1, 1] and not clamped.
    """
    b, t = latents.shape[:2]
    z = latents.reshape(b * t, *latents.shape[2:]).astype(jnp.float32) / self.cfg.scale_factor
    x = self.decoder(self.post_quant_conv(z.astype(to_dtype(self.cfg.dtype))))  # [B*T, H, W, C]
    return x.astype(jnp.float32).reshape(b, t, *x.shape[1:])


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _decode_chunks(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array, chunk: int) -> jax.Array:
  return decode_in_chunks(nnx.merge(graphdef, state), latents, chunk)


def decode_in_chunks(vae: AutoencoderKL, latents: jax.Array, chunk: int) -> jax.Array:
  """The traceable body of :func:`decode_chunked` (for use inside ``jit`` / ``shard_map``)."""
  chunk = min(chunk, latents.shape[1])
  b, t = latents.shape[:2]
  n = -(-t // chunk)
  # Frames are independent (per-frame GroupNorm and attention), so zero frames padding the last chunk
  # change nothing in the real ones; they are cropped below.
  z = jnp.pad(latents, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (latents.ndim - 2))
  z = jnp.swapaxes(z.reshape(b, n, chunk, *z.shape[2:]), 0, 1)  # [n, B, chunk, h, w, c]
  x = jax.lax.map(vae.decode, z)  # [n, B, chunk, H, W, C]: one chunk's activations live at a time
  x = jnp.swapaxes(x, 0, 1).reshape(b, n * chunk, *x.shape[3:])  # [B, n*chunk, H, W, C]
  return x[:, :t]


def decode_chunked(vae: AutoencoderKL, latents: jax.Array, chunk: int) -> jax.Array:
  """``vae.decode(latents)`` for long videos: ``chunk`` frames (per batch row) at a time, in one jit.

  Activation memory is that of decoding ``B * chunk`` frames; only the output holds every frame. The
  frame count need not be a multiple of ``chunk`` (the last chunk is padded, then cropped).

  Args:
    vae: the autoencoder.
    latents: ``[B, T, h, w, embed_dim]`` as the UNet sees them.
    chunk: frames per step, >= 1 (values above T decode everything in one step).

  Returns:
    ``[B, T, h*f, w*f, out_channels]`` float32, the same values as ``vae.decode(latents)``.
  """
  if chunk < 1:
    raise ValueError(f"chunk={chunk}, expected >= 1")
  graphdef, state = nnx.split(vae)
  return _decode_chunks(graphdef, state, latents, min(chunk, latents.shape[1]))


def build(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
  """An autoencoder with random weights (tests, the tiny demo, benchmarks)."""
  return AutoencoderKL(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: VAEConfig) -> AutoencoderKL:
  """The autoencoder with ShapeDtypeStructs instead of arrays: nothing is allocated."""
  return abstract_model(AutoencoderKL, cfg)


def from_params(cfg: VAEConfig, params: dict) -> AutoencoderKL:
  """An autoencoder holding ``params`` (the nested dict of ``convert.vae_table.convert_vae``).

  Raises ValueError when ``params`` lacks a parameter of the model (an extra one fails in
  ``nnx.replace_by_pure_dict``).
  """
  graphdef, state = nnx.split(abstract(cfg))
  pdt = to_dtype(cfg.param_dtype)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, pdt), params))
  unset = [
    jax.tree_util.keystr(p)
    for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    if isinstance(leaf, jax.ShapeDtypeStruct)
  ]
  if unset:
    raise ValueError(f"{len(unset)} VAE parameters missing from params: {unset[:8]}")
  return nnx.merge(graphdef, state)
