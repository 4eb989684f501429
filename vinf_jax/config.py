"""Frozen configuration dataclasses: model presets, temporal-parallel options.

Only entry points (``vinf_jax.sample``, ``convert.videocrafter2``) read flags; everything else takes
these dataclasses. Every ``validate()`` lists every offending value with what was expected.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from vinf_jax import schedule as schedule_lib


def _check(errors: list[str], ok: bool, msg: str) -> None:
  if not ok:
    errors.append(msg)


def _raise(name: str, errors: list[str]) -> None:
  if errors:
    raise ValueError(f"invalid {name}:\n  - " + "\n  - ".join(errors))


def to_dtype(name: str):
  """'float32' | 'bfloat16' | 'float16' -> jnp dtype (configs keep names so they serialise)."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"dtype {name!r} is not one of 'float32', 'bfloat16', 'float16'") from None


def _check_dtypes(errors: list[str], cfg) -> None:
  for f in ("dtype", "param_dtype"):
    try:
      to_dtype(getattr(cfg, f))
    except ValueError as err:
      errors.append(f"{f}: {err}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """VideoCrafter2's 3D UNet (``lvdm.modules.networks.openaimodel3d.UNetModel``).

  Attributes:
    in_channels: latent channels in.
    out_channels: latent channels out (epsilon prediction).
    model_channels: channels of the first level.
    channel_mult: per-level channel multipliers; one downsample between consecutive levels.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attention_levels: levels (0-based) that carry a spatial and a temporal transformer after each ResBlock.
    num_head_channels: channels per attention head (heads = channels / this).
    context_dim: width of the text context for cross-attention.
    init_attn_heads: heads of ``init_attn`` (its inner width is heads * num_head_channels).
    fps_cond: add the fps embedding to the time embedding.
    time_cond_proj_dim: width of the guidance (w) embedding that ``time_cond_proj`` (Linear to model_channels,
      no bias) adds to the timestep embedding: 256 in the T2V-Turbo models (guidance distilled into the
      UNet), 0 = none (VideoCrafter2).
    motion_cond: T2V-Turbo-v2's motion conditioning: ``motion_cond_proj`` embeds the motion scale like w, and
      ``combine_proj`` (Linear 2*model_channels -> model_channels, no bias) mixes the two conditions.
    num_groups: GroupNorm groups everywhere in the UNet.
    dtype: compute dtype name; normalisation statistics and softmax are always float32.
    param_dtype: dtype name the parameters are held in.
    attention_impl: 'xla', 'cudnn' or 'auto' (cudnn for 16-bit compute on GPU) for spatial attention.
    kernel_impl: 'jax', 'pallas' or 'auto' (Pallas kernels on GPU): how the memory-bound elementwise passes
      (the feed-forwards' GEGLU) run; the same function either way (``vinf_jax.layers.kernels``).
  """

  in_channels: int = 4
  out_channels: int = 4
  model_channels: int = 320
  channel_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attention_levels: tuple[int, ...] = (0, 1, 2)
  num_head_channels: int = 64
  context_dim: int = 1024
  init_attn_heads: int = 8
  fps_cond: bool = True
  time_cond_proj_dim: int = 0
  motion_cond: bool = False
  num_groups: int = 32
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  kernel_impl: str = "auto"

  @property
  def time_embed_dim(self) -> int:
    return self.model_channels * 4

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_mult) - 1)

  def validate(self) -> UNetConfig:
    e: list[str] = []
    for lvl, m in enumerate(self.channel_mult):
      c = self.model_channels * m
      _check(e, c % self.num_groups == 0, f"channels {c} of level {lvl} not divisible by num_groups={self.num_groups}")
      _check(
        e,
        c % self.num_head_channels == 0,
        f"channels {c} of level {lvl} not divisible by num_head_channels={self.num_head_channels}",
      )
    _check(
      e,
      all(0 <= a < len(self.channel_mult) for a in self.attention_levels),
      f"attention_levels={self.attention_levels} must index channel_mult (0..{len(self.channel_mult) - 1})",
    )
    _check(
      e,
      self.attention_impl in ("auto", "xla", "cudnn"),
      f"attention_impl={self.attention_impl!r}, expected 'auto', 'xla' or 'cudnn'",
    )
    _check(
      e,
      isinstance(self.time_cond_proj_dim, int) and self.time_cond_proj_dim >= 0 and self.time_cond_proj_dim % 2 == 0,
      f"time_cond_proj_dim={self.time_cond_proj_dim!r}, expected an even integer >= 0 (0: no guidance embedding)",
    )
    _check(
      e,
      not self.motion_cond or self.time_cond_proj_dim > 0,
      f"motion_cond=True needs a guidance embedding (time_cond_proj_dim > 0), got {self.time_cond_proj_dim}",
    )
    _check(
      e,
      self.kernel_impl in ("auto", "jax", "pallas"),
      f"kernel_impl={self.kernel_impl!r}, expected 'auto', 'jax' or 'pallas'",
    )
    _check_dtypes(e, self)
    _raise("UNetConfig", e)
    return self


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """KL-f8 autoencoder (``first_stage_model``), run per frame.

  Attributes:
    in_channels: image channels.
    out_channels: image channels out of the decoder.
    ch: channels of the first level.
    ch_mult: per-level multipliers.
    num_res_blocks: ResnetBlocks per level in the encoder (decoder has one more).
    z_channels: latent channels.
    embed_dim: channels after ``quant_conv`` / before ``post_quant_conv``.
    num_groups: GroupNorm groups.
    scale_factor: latent scale (the UNet sees ``scale_factor * z``).
    dtype: compute dtype name.
    param_dtype: parameter dtype name.
  """

  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  embed_dim: int = 4
  num_groups: int = 32
  scale_factor: float = 0.18215
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def validate(self) -> VAEConfig:
    e: list[str] = []
    _check(e, bool(self.ch_mult), "ch_mult is empty, expected at least one level")
    for lvl, m in enumerate(self.ch_mult):
      c = self.ch * m
      _check(e, c % self.num_groups == 0, f"channels {c} of level {lvl} not divisible by num_groups={self.num_groups}")
    _check(e, self.ch % self.num_groups == 0, f"ch={self.ch} not divisible by num_groups={self.num_groups}")
    for f in ("in_channels", "out_channels", "num_res_blocks", "z_channels", "embed_dim"):
      _check(e, getattr(self, f) >= 1, f"{f}={getattr(self, f)}, expected >= 1")
    _check(e, self.scale_factor > 0, f"scale_factor={self.scale_factor}, expected > 0")
    _check_dtypes(e, self)
    _raise("VAEConfig", e)
    return self


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """OpenCLIP ViT-H/14 text tower as VideoCrafter2 uses it (penultimate layer, then ln_final).

  Attributes:
    vocab_size: token embedding rows.
    context_length: tokens per prompt.
    width: model width.
    heads: attention heads.
    layers: resblocks stored in the checkpoint.
    layers_used: resblocks run before ``ln_final`` (VideoCrafter2: ``layers - 1``, the penultimate output; a
      diffusers pipeline's ``CLIPTextModel``: all it stores, its ``last_hidden_state``).
    mlp_ratio: MLP hidden = width * mlp_ratio.
    pad_id: the tokenizer's padding id (open_clip and SD2-style CLIP tokenizers: 0, the token "!"; a tokenizer
      whose pad token is ``<|endoftext|>``: 49407).
    pad_text: the pad token's text where a diffusers pipeline's CLIP tokenizer holds it as an added token
      (SD2-style '!'): transformers then reads that text as the pad id wherever it appears in a prompt, and so
      does this tokenizer; '' = open_clip's rule (VideoCrafter2).
    dtype: compute dtype name.
    param_dtype: parameter dtype name.
  """

  vocab_size: int = 49408
  context_length: int = 77
  width: int = 1024
  heads: int = 16
  layers: int = 24
  layers_used: int = 23
  mlp_ratio: int = 4
  pad_id: int = 0
  pad_text: str = ""
  dtype: str = "float32"
  param_dtype: str = "float32"

  def validate(self) -> TextConfig:
    e: list[str] = []
    _check(e, self.width % self.heads == 0, f"width={self.width} not divisible by heads={self.heads}")
    _check(
      e,
      1 <= self.layers_used <= self.layers,
      f"layers_used={self.layers_used}, expected 1 <= layers_used <= layers={self.layers}",
    )
    for f in ("vocab_size", "context_length", "width", "heads", "mlp_ratio"):
      _check(e, getattr(self, f) >= 1, f"{f}={getattr(self, f)}, expected >= 1")
    _check(e, 0 <= self.pad_id < self.vocab_size, f"pad_id={self.pad_id}, expected 0..{self.vocab_size - 1}")
    _check_dtypes(e, self)
    _raise("TextConfig", e)
    return self


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything a VideoCrafter2 checkpoint (or a diffusers text-to-video pipeline folder) holds.

  Attributes:
    name: the preset (or ``diffusers_t2v`` for a pipeline that matches none).
    unet, vae, text: the components' configs.
    schedule: the noise schedule and timestep spacing the samplers use (:mod:`vinf_jax.schedule`).
    video_size: (frames, height, width) the model was trained at (its default clip).
    kind: what the weights are, in words (shown by the web page, ``--helpfull`` and the sidecar).
  """

  name: str
  unet: UNetConfig
  vae: VAEConfig
  text: TextConfig
  schedule: schedule_lib.Schedule = schedule_lib.VIDEOCRAFTER2
  video_size: tuple[int, ...] = (16, 320, 512)
  kind: str = "VideoCrafter2 (LatentDiffusion checkpoint)"

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    def build(klass, sub):
      kw = {}
      for f in dataclasses.fields(klass):
        if f.name in sub:
          v = sub[f.name]
          kw[f.name] = tuple(v) if isinstance(v, list) else v
      unknown = set(sub) - {f.name for f in dataclasses.fields(klass)}
      if unknown:
        raise ValueError(f"unknown {klass.__name__} fields {sorted(unknown)}")
      return klass(**kw)

    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    top = {k: (tuple(d[k]) if isinstance(d[k], list) else d[k]) for k in ("video_size", "kind") if k in d}
    return cls(
      name=d["name"],
      unet=build(UNetConfig, d["unet"]),
      vae=build(VAEConfig, d["vae"]),
      text=build(TextConfig, d["text"]),
      # converted directories before issue 26 hold no schedule: VideoCrafter2's
      schedule=build(schedule_lib.Schedule, d.get("schedule", {})),
      **top,
    )

  def with_dtype(self, dtype: str, param_dtype: str | None = None) -> ModelConfig:
    p = param_dtype or dtype
    r = dataclasses.replace
    return r(
      self,
      unet=r(self.unet, dtype=dtype, param_dtype=p),
      vae=r(self.vae, dtype=dtype, param_dtype=p),
      text=r(self.text, dtype=dtype, param_dtype=p),
    )


VIDEOCRAFTER2 = ModelConfig(name="videocrafter2", unet=UNetConfig(), vae=VAEConfig(), text=TextConfig())

# Same topology as VideoCrafter2 (4 levels, attention at the first three, temporal convs, both temporal
# attentions, init_attn, fps embedding), small enough for CPU tests and the demo.
TINY = ModelConfig(
  name="tiny",
  unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_head_channels=8, context_dim=32, num_groups=32),
  vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, num_groups=32),
  text=TextConfig(width=32, heads=4, layers=3, layers_used=2),
  video_size=(32, 128, 128),
  kind="tiny VideoCrafter2-shaped model (random weights)",
)


def turbo(cfg: ModelConfig, *, motion: bool = False) -> ModelConfig:
  """``cfg`` as a T2V-Turbo model: the guidance embedding (v1), and with ``motion`` v2's motion conditioning."""
  name = cfg.name + ("_turbo_v2" if motion else "_turbo")
  return dataclasses.replace(
    cfg,
    name=name,
    unet=dataclasses.replace(cfg.unet, time_cond_proj_dim=256, motion_cond=motion),
    kind=f"T2V-Turbo{'-v2' if motion else ''} ({cfg.kind})",
  )


def modelscope_family(cfg: ModelConfig, name: str, video_size: tuple[int, int, int], kind: str) -> ModelConfig:
  """``cfg``'s shapes as a diffusers ``TextToVideoSDPipeline`` of the ModelScope family: the same UNet3D without
  fps conditioning, the CLIPTextModel's stored layers all run (23 of OpenCLIP's 24 for the full size), and the
  pipeline's DDIM schedule (``vinf_jax.schedule.MODELSCOPE``)."""
  r = dataclasses.replace
  n = cfg.text.layers_used
  return r(
    cfg,
    name=name,
    unet=r(cfg.unet, fps_cond=False),
    text=r(cfg.text, layers=n, layers_used=n),
    schedule=schedule_lib.MODELSCOPE,
    video_size=video_size,
    kind=kind,
  )


MODELSCOPE = modelscope_family(
  VIDEOCRAFTER2, "modelscope", (16, 256, 256), "ModelScope text-to-video (damo-vilab/text-to-video-ms-1.7b)"
)
ZEROSCOPE_576W = modelscope_family(
  VIDEOCRAFTER2, "zeroscope_576w", (24, 320, 576), "ZeroScope v2 576w (cerspense/zeroscope_v2_576w)"
)
ZEROSCOPE_XL = modelscope_family(
  VIDEOCRAFTER2, "zeroscope_xl", (24, 576, 1024), "ZeroScope v2 XL (cerspense/zeroscope_v2_XL)"
)
# The tiny preset's shapes as a diffusers pipeline (tests, the random demo of the ModelScope family).
TINY_T2V = modelscope_family(TINY, "tiny_t2v", (16, 128, 128), "tiny diffusers text-to-video pipeline (random)")

PRESETS = {
  m.name: m
  for m in (
    VIDEOCRAFTER2,
    TINY,
    MODELSCOPE,
    ZEROSCOPE_576W,
    ZEROSCOPE_XL,
    TINY_T2V,
    turbo(VIDEOCRAFTER2),  # T2V-Turbo (VC2), v1: time_cond_proj
    turbo(VIDEOCRAFTER2, motion=True),  # T2V-Turbo-v2: + motion_cond_proj, combine_proj
    turbo(TINY),
    turbo(TINY, motion=True),
  )
}


def preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"model preset {name!r} is not one of {sorted(PRESETS)}")
  return PRESETS[name]


@dataclasses.dataclass(frozen=True)
class TemporalConfig:
  """How the temporal layers see frames (Video-Infinity's clip parallelism; method notes sections 2-3).

  Attributes:
    attention: 'full' (every frame attends to every frame of the video: plain VideoCrafter2 on one
      device) or 'dual' (Video-Infinity's dual-scope attention: a +-``window`` local band plus
      ``num_global`` global frames in one softmax).
    window: P, the local half-window in frames (query frame i sees i-P..i+P).
    num_global: G, the number of global frames (see ``global_frames``).
    global_frames: which frames are global: 'video' (the fixed video indices k * N / G, so the result does
      not depend on the device count; G must divide N) or 'official' (as the official code: each device's
      local frames ``0, s, 2s, ...`` with ``s = max(T // (G // D), 1)`` (only frame 0 when G < D), in
      device order, the first G of them; fewer than G when they run out).
    global_phase_from: timesteps t >= this add ``global_bias`` to the global keys' logits.
    local_phase_below: timesteps t < this add ``local_bias`` to the local keys' logits.
    global_bias: logit bias on global keys in the global phase (official: 10).
    local_bias: logit bias on local keys in the local phase (official: 10).
    video_ends: 'zeros' (official: zero K/V beyond the video ends stay unmasked, acting as sinks) or
      'mask' (they are masked out).
    group_norm: 'global' (statistics of the frame-spanning GroupNorms over the whole video, so the
      result does not depend on the device count) or 'local' (per device, as the official code; the
      temporal conv blocks then also normalise over their halo-padded window as the official plugin).
    query_block: frames per query block of the dual-scope attention (0 = automatic); memory only.
  """

  attention: str = "full"
  window: int = 8
  num_global: int = 16
  global_phase_from: float = 800.0
  local_phase_below: float = 800.0
  global_bias: float = 10.0
  local_bias: float = 10.0
  video_ends: str = "zeros"
  global_frames: str = "video"
  group_norm: str = "global"
  query_block: int = 0

  def validate(self) -> TemporalConfig:
    e: list[str] = []
    _check(e, self.attention in ("full", "dual"), f"attention={self.attention!r}, expected 'full' or 'dual'")
    _check(e, self.window >= 0, f"window={self.window}, expected >= 0")
    _check(e, self.num_global >= 1, f"num_global={self.num_global}, expected >= 1")
    _check(e, self.video_ends in ("zeros", "mask"), f"video_ends={self.video_ends!r}, expected 'zeros' or 'mask'")
    _check(
      e,
      self.global_frames in ("video", "official"),
      f"global_frames={self.global_frames!r}, expected 'video' or 'official'",
    )
    _check(e, self.group_norm in ("global", "local"), f"group_norm={self.group_norm!r}, expected 'global' or 'local'")
    _check(e, self.query_block >= 0, f"query_block={self.query_block}, expected >= 0")
    _raise("TemporalConfig", e)
    return self
