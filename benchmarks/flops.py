"""Analytic FLOP count of VideoCrafter2's 3D UNet, read off the architecture (no tracing, no XLA).

Used by ``benchmarks/step_measure.py`` for MFU (the numerator is what the model needs, not what XLA happens to
execute) and as a cross-check of XLA's own cost analysis.
"""

from __future__ import annotations

import collections

from vinf_jax.config import UNetConfig

# one text prompt of OpenCLIP: 77 tokens
CONTEXT_LEN = 77


def unet_flops(
  cfg: UNetConfig,
  height: int,
  width: int,
  frames: int,
  *,
  attention: str = "dual",
  window: int = 8,
  num_global: int = 16,
  num_shards: int = 1,
  query_block: int = 0,
  executed: bool = False,
  context_len: int = CONTEXT_LEN,
) -> dict[str, float]:
  """FLOPs of one UNet pass over ``frames`` frames of ONE batch element at a ``height x width`` latent.

  FLOPs are 2 x multiply-adds of the matmuls and convolutions; elementwise work (GroupNorm, LayerNorm,
  SiLU/GELU, softmax, residual adds, the sampler update) is not counted: it is a few percent at full size
  and runs on the vector units, not the tensor cores that MFU is about. A guided step (CFG batch 2 in one
  call) costs twice this.

  Counted, per frame at each level's resolution (m = h*w tokens, c = channels):

  * ``conv2d``: ``conv_in`` (4 -> 320), ``out_conv`` (320 -> 4), and per ResBlock ``in_conv``
    (3x3, c_in -> c), ``out_conv`` (3x3, c -> c) and the 1x1 ``skip_connection`` when c_in != c;
  * ``temporal_conv``: the four kernel-3 convs (c -> c) of each ResBlock's temporal conv block;
  * ``resample``: the 3x3 stride-2 Downsample convs (at the output resolution) and the 3x3 convs after
    the nearest x2 Upsample (at the upsampled resolution);
  * ``spatial_linear``: SpatialTransformer ``proj_in``/``proj_out`` (c -> c), ``to_q/to_k/to_v/to_out``
    of the self-attention, ``to_q``/``to_out`` of the cross-attention;
  * ``spatial_attention``: QK^T and AV of the self-attention (m keys) and of the cross-attention
    (``context_len`` = 77 text keys);
  * ``temporal_linear``: TemporalTransformer (and ``init_attn``: 320 -> 512 inner) ``proj_in``/``proj_out``,
    ``to_q/to_k/to_v/to_out`` of its two self-attentions;
  * ``temporal_attention``: QK^T and AV of the two temporal self-attentions, per query frame and pixel over
    K keys: 'dual' K = 2P+1 local + G global, 'full' K = all frames of the video (frames * num_shards);
  * ``feed_forward``: GEGLU of every transformer block (d -> 8d, then 4d -> d);
  * ``per_call``: what runs once per batch element, not per frame: the time and fps embedding MLPs,
    every ResBlock's ``emb_proj``, and the cross-attentions' ``to_k``/``to_v`` of the 77 text tokens
    (this implementation computes them once for all frames; VideoCrafter2 repeats them per frame).

  Args:
    cfg: the UNet config (channels, levels, attention levels, head width, context width).
    height, width: the latent size (320x512 video -> 40x64).
    frames: frames this pass covers (per device, when ``num_shards`` > 1).
    attention: 'dual' or 'full' temporal attention.
    window, num_global: P and G of the dual-scope attention.
    num_shards: devices the video is split over (the video has ``frames * num_shards`` frames).
    query_block: frames per query block of the dual attention (0: the automatic choice) when ``executed``.
    executed: count what this implementation computes, the way XLA's cost analysis counts it, rather
      than what the model needs: the exact multi-device temporal conv block recomputes its shrinking
      halo (stage k outputs T + 6 - 2k frames, so 4T + 12 frame-stages instead of 4T); the blocked dual
      attention scores every query of a Q-frame block against all Q + 2P window keys (masked) plus G
      global keys; and a convolution counts only the kernel taps that land inside its zero padding's
      image (XLA's convention: 3n - 2 of the 3n taps along a padded axis of n, so a 3x3 conv at 5x8 counts
      79% of the dense figure, at 40x64 97%). Not counted: the frames that ``frame_chunk`` recomputes when
      it does not divide the frames.
    context_len: text tokens (77).

  Returns:
    FLOPs per category (see above) plus ``total``, for the ``frames`` frames of one batch element.
  """
  if attention not in ("dual", "full"):
    raise ValueError(f"attention={attention!r}, expected 'dual' or 'full'")
  f = collections.Counter()
  hc, ed, mc = cfg.num_head_channels, cfg.time_embed_dim, cfg.model_channels

  if attention == "full":
    temporal_keys = frames * num_shards
  elif executed:
    from vinf_jax.layers.attention import query_block as _query_block  # the implementation's own choice

    temporal_keys = _query_block(frames, window, query_block) + 2 * window + num_global
  else:
    temporal_keys = 2 * window + 1 + num_global

  def taps(n: int, stride: int = 1) -> int:
    """(output, tap) pairs of a kernel-3 conv with padding 1 along an axis of n: 3 per output, or with
    ``executed`` only the taps inside the axis."""
    outs = range(0, n, stride)
    if not executed:
      return 3 * len(outs)
    return sum(1 for o in outs for j in (-1, 0, 1) if 0 <= o + j < n)

  if executed and num_shards > 1:
    # the exact multi-device block: unpadded convs on the halo-extended clip, outputs T + 6, T + 4, T + 2, T
    temporal_taps = 3 * (4 * frames + 12)
  else:
    temporal_taps = 4 * taps(frames)  # 4 stages, zero padding of one frame at the clip's ends

  def conv3(cin, cout, hw, stride=1):  # hw: the input's (height, width)
    return 2 * cin * cout * taps(hw[0], stride) * taps(hw[1], stride) * frames

  def linear(cin, cout, m):
    return 2 * cin * cout * m * frames

  def block(d, m, keys1, cross: bool, key_cat: str, lin_cat: str):
    # attn1: self over keys1 keys; attn2: cross to the text, or a second self-attention
    f[lin_cat] += 4 * linear(d, d, m)
    f[key_cat] += 2 * 2 * keys1 * d * m * frames  # QK^T and AV
    if cross:
      f[lin_cat] += 2 * linear(d, d, m)  # to_q, to_out
      f[key_cat] += 2 * 2 * context_len * d * m * frames
      f["per_call"] += 2 * 2 * context_len * cfg.context_dim * d  # to_k, to_v of the text
    else:
      f[lin_cat] += 4 * linear(d, d, m)
      f[key_cat] += 2 * 2 * keys1 * d * m * frames
    f["feed_forward"] += linear(d, 8 * d, m) + linear(4 * d, d, m)

  def spatial(c, hw):
    m = hw[0] * hw[1]
    f["spatial_linear"] += 2 * linear(c, c, m)
    block(c, m, m, True, "spatial_attention", "spatial_linear")

  def temporal(c, inner, hw):
    m = hw[0] * hw[1]
    f["temporal_linear"] += 2 * linear(c, inner, m)
    block(inner, m, temporal_keys, False, "temporal_attention", "temporal_linear")

  def resblock(cin, cout, hw):
    m = hw[0] * hw[1]
    f["conv2d"] += conv3(cin, cout, hw) + conv3(cout, cout, hw) + (linear(cin, cout, m) if cin != cout else 0)
    f["temporal_conv"] += 2 * cout * cout * m * temporal_taps
    f["per_call"] += 2 * ed * cout  # emb_proj

  f["per_call"] += 2 * 2 * (mc * ed + ed * ed) * (2 if cfg.fps_cond else 1)  # time (+ fps) MLP
  levels = len(cfg.channel_mult)
  res = [(height // 2**k, width // 2**k) for k in range(levels)]
  f["conv2d"] += conv3(cfg.in_channels, mc, res[0])
  temporal(mc, cfg.init_attn_heads * hc, res[0])  # init_attn

  chans, ch = [mc], mc
  for level, mult in enumerate(cfg.channel_mult):
    for _ in range(cfg.num_res_blocks):
      resblock(ch, mult * mc, res[level])
      ch = mult * mc
      if level in cfg.attention_levels:
        spatial(ch, res[level])
        temporal(ch, ch, res[level])
      chans.append(ch)
    if level != levels - 1:
      f["resample"] += conv3(ch, ch, res[level], stride=2)  # Downsample: stride 2, padding 1
      chans.append(ch)

  resblock(ch, ch, res[-1])
  spatial(ch, res[-1])
  temporal(ch, ch, res[-1])
  resblock(ch, ch, res[-1])

  for level, mult in reversed(list(enumerate(cfg.channel_mult))):
    for i in range(cfg.num_res_blocks + 1):
      resblock(ch + chans.pop(), mc * mult, res[level])
      ch = mc * mult
      if level in cfg.attention_levels:
        spatial(ch, res[level])
        temporal(ch, ch, res[level])
      if level and i == cfg.num_res_blocks:
        f["resample"] += conv3(ch, ch, res[level - 1])  # after the nearest x2 Upsample
  f["conv2d"] += conv3(ch, cfg.out_channels, res[0])

  out = {k: float(v) for k, v in sorted(f.items())}
  out["total"] = float(sum(f.values()))
  return out


def step_flops(cfg: UNetConfig, height: int, width: int, frames: int, **kw) -> float:
  """FLOPs of one guided denoising step over ``frames`` frames: the UNet at batch 2 (both CFG branches)."""
  return 2 * unet_flops(cfg, height, width, frames, **kw)["total"]
