"""T2V-Turbo weights: which layout a UNet's keys are, and v1's LoRA list merged into VideoCrafter2's UNet.

Three files people hold (``shared/reference/t2v_turbo.md``):

* ``t2v_turbo_vc2.pt``: the merged v1 checkpoint, VideoCrafter2's keys plus ``time_cond_proj.weight``;
* ``unet_lora.pt`` (v1): a plain list ``[up0, down0, up1, down1, ...]`` of one (up, down) pair for every
  Linear / Conv2d / Conv3d weight of the UNet (:func:`lora_keys` gives their order), applied on top of
  VideoCrafter2's ``model.ckpt``; ``time_cond_proj``'s own base weight is in neither file;
* ``unet_mg.pt`` / ``unet_no_mg.pt`` (v2): a whole UNet state dict without the ``model.diffusion_model.``
  prefix, plus ``time_cond_proj``, ``motion_cond_proj`` and ``combine_proj``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from convert.common import ConversionError, SourceTensor
from vinf_jax.config import ModelConfig, turbo

TIME_COND = "time_cond_proj.weight"
MOTION_KEYS = ("motion_cond_proj.weight", "combine_proj.weight")
GUIDANCE_EMBED_DIM = 256
LORA_RANK = 64
# v1 never saved time_cond_proj's base weight; training and the official demo build it with PyTorch's
# default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = U(-1/16, 1/16), unseeded. Ours is this draw.
TIME_COND_BASE_SEED = 20240101

# Module registration order of VideoCrafter2's UNet (its state dict's order), by name; numbers sort as numbers.
_ORDER = [
  "time_embed",
  "fps_embedding",
  "time_cond_proj",
  "input_blocks",
  "init_attn",
  "middle_block",
  "output_blocks",
  "out",
  "in_layers",
  "emb_layers",
  "out_layers",
  "skip_connection",
  "temopral_conv",
  "conv1",
  "conv2",
  "conv3",
  "conv4",
  "op",
  "conv",
  "norm",
  "proj_in",
  "transformer_blocks",
  "attn1",
  "ff",
  "attn2",
  "norm1",
  "norm2",
  "norm3",
  "proj_out",
  "to_q",
  "to_k",
  "to_v",
  "to_out",
  "net",
  "proj",
  "weight",
  "bias",
]
_RANK = {n: i for i, n in enumerate(_ORDER)}


def state_dict_order(key: str) -> tuple:
  """Sort key that puts UNet keys (prefix stripped) in VideoCrafter2's state-dict order."""
  out = []
  for part in key.split("."):
    if part.isdigit():
      out.append((1, int(part)))
    elif part in _RANK:
      out.append((0, _RANK[part]))
    else:
      raise ConversionError(f"UNet key {key!r}: unknown module name {part!r} (cannot place it in the LoRA order)")
  return tuple(out)


def lora_keys(unet_shapes: Mapping[str, Sequence[int]]) -> list[str]:
  """The UNet weights the v1 LoRA list has a pair for, in its order: every ``.weight`` of 2, 4 or 5 dims
  (Linear, Conv2d, Conv3d; not the norms, not init_attn's Conv1d projections) in state-dict order, with
  ``time_cond_proj.weight`` right after ``fps_embedding.2.weight``."""
  keys = [k for k, s in unet_shapes.items() if k.endswith(".weight") and len(s) in (2, 4, 5)]
  return sorted(keys, key=state_dict_order)


def lora_rank(shape: Sequence[int]) -> int:
  return min(LORA_RANK, shape[0], shape[1])


def lora_pair_shapes(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(up, down) shapes for a weight: Linear up [O, r], down [r, I]; conv down [r, I, *kernel], up [O, r, 1...]."""
  r = lora_rank(shape)
  o, i, *k = shape
  return (o, r, *([1] * len(k))), (r, i, *k)


def time_cond_base(model_channels: int = 320, dim: int = GUIDANCE_EMBED_DIM, seed: int = TIME_COND_BASE_SEED):
  """The fixed draw that stands in for v1's unsaved ``time_cond_proj`` base: U(-1/sqrt(dim), 1/sqrt(dim)) [C, dim]."""
  bound = 1.0 / np.sqrt(dim)
  return np.random.default_rng(seed).uniform(-bound, bound, (model_channels, dim)).astype(np.float32)


def detect(cfg: ModelConfig, unet: Mapping[str, SourceTensor]) -> ModelConfig:
  """``cfg`` turned into the T2V-Turbo variant the UNet's keys hold (unchanged for plain VideoCrafter2 keys).

  Raises ConversionError when the turbo keys are partial (v2's motion keys without time_cond_proj, one of the
  two motion keys) or time_cond_proj has the wrong shape.
  """
  has = [k for k in (TIME_COND, *MOTION_KEYS) if k in unet]
  if not has:
    return cfg
  c = cfg.unet.model_channels
  want = {TIME_COND: (c, GUIDANCE_EMBED_DIM), MOTION_KEYS[0]: (c, GUIDANCE_EMBED_DIM), MOTION_KEYS[1]: (c, 2 * c)}
  bad = [f"{k} {tuple(unet[k].shape)}, expected {want[k]}" for k in has if tuple(unet[k].shape) != want[k]]
  if bad:
    raise ConversionError("T2V-Turbo keys of the wrong shape: " + "; ".join(bad))
  motion = [k for k in MOTION_KEYS if k in unet]
  if TIME_COND not in unet or motion and len(motion) != len(MOTION_KEYS):
    missing = [k for k in (TIME_COND, *MOTION_KEYS) if k not in unet]
    raise ConversionError(f"a partial T2V-Turbo UNet: has {has}, missing {missing}")
  return turbo(cfg, motion=bool(motion))


def strip_unet_prefix(sd: Mapping[str, SourceTensor], prefix: str) -> dict[str, SourceTensor]:
  """v2's UNet file is prefix-less; accept it with VideoCrafter2's ``model.diffusion_model.`` prefix too."""
  if sd and all(k.startswith(prefix) for k in sd):
    return {k[len(prefix) :]: v for k, v in sd.items()}
  return dict(sd)


@dataclasses.dataclass(frozen=True)
class LoraInfo:
  """What a v1 LoRA merge did (recorded in the converted directory's config.json)."""

  pairs: int
  rank: int
  time_cond_proj_base: dict


def merge_lora(
  unet: Mapping[str, SourceTensor], lora: Sequence[SourceTensor], *, model_channels: int
) -> tuple[dict[str, SourceTensor], LoraInfo]:
  """VideoCrafter2's UNet sources with v1's LoRA list merged in (lazily, one weight at a time, float32).

  ``W += (up.flatten(1) @ down.flatten(1)).reshape(W.shape)`` for every pair, scale 1; ``time_cond_proj``
  (absent from both files) starts from :func:`time_cond_base`. Strict: the list must have exactly two
  tensors per weight, each of its shape; errors name the index, the module and the shapes.
  """
  if TIME_COND in unet:
    raise ConversionError(
      f"the base checkpoint already has {TIME_COND}: it is a merged T2V-Turbo checkpoint; drop --turbo_lora"
    )
  base = time_cond_base(model_channels)
  sources = dict(unet)
  sources[TIME_COND] = SourceTensor(base.shape, lambda: base, "float32")
  keys = lora_keys({k: v.shape for k, v in sources.items()})
  if len(lora) != 2 * len(keys):
    raise ConversionError(
      f"the LoRA list has {len(lora)} tensors; this UNet takes {2 * len(keys)} ({len(keys)} (up, down) pairs: "
      f"{keys[0]}, ..., {keys[-1]})"
    )
  bad = []
  for n, key in enumerate(keys):
    up, down = lora[2 * n], lora[2 * n + 1]
    want_up, want_down = lora_pair_shapes(sources[key].shape)
    if tuple(up.shape) != want_up or tuple(down.shape) != want_down:
      bad.append(
        f"pair {n} (list indices {2 * n}, {2 * n + 1}) for {key} {tuple(sources[key].shape)}: up {tuple(up.shape)}, "
        f"down {tuple(down.shape)}; expected up {want_up}, down {want_down}"
      )
  if bad:
    head = "\n      ".join(bad[:8]) + (f"\n      ... and {len(bad) - 8} more" if len(bad) > 8 else "")
    raise ConversionError(f"{len(bad)} LoRA pairs of the wrong shape:\n      {head}")

  def merged(w: SourceTensor, up: SourceTensor, down: SourceTensor):
    def load():
      base = np.asarray(w.load(), np.float32)
      u = np.asarray(up.load(), np.float32).reshape(up.shape[0], -1)
      d = np.asarray(down.load(), np.float32).reshape(down.shape[0], -1)
      return base + (u @ d).reshape(base.shape)

    return SourceTensor(w.shape, load, "float32")

  for n, key in enumerate(keys):
    sources[key] = merged(sources[key], lora[2 * n], lora[2 * n + 1])
  info = LoraInfo(
    pairs=len(keys),
    rank=LORA_RANK,
    time_cond_proj_base={
      "rule": "U(-1/16, 1/16): PyTorch's default nn.Linear(256, C) init, which v1 never saved",
      "generator": "numpy.random.default_rng",
      "seed": TIME_COND_BASE_SEED,
    },
  )
  return sources, info
