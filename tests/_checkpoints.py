"""Synthetic checkpoints laid out exactly like the real one (random weights; keys from the tables)."""

from __future__ import annotations

import numpy as np
import torch

from convert import common, text_table, unet_table, vae_table
from vinf_jax import sampling
from vinf_jax.config import ModelConfig
from vinf_jax.models import unet3d, vae


def source_shape(transform: str, target: tuple[int, ...]) -> tuple[int, ...]:
  """Inverse of the named transforms on shapes."""
  if transform == "identity":
    return tuple(target)
  if transform == "linear":
    return tuple(target[::-1])
  if transform == "conv":  # [*k, I, O] -> [O, I, *k]
    return (target[-1], target[-2], *target[:-2])
  if transform == "conv1x1_as_linear":
    return (target[1], target[0], 1, 1)
  if transform == "conv1d_as_linear":
    return (target[1], target[0], 1)
  if transform == "temporal_conv":  # [3, I, O] -> [O, I, 3, 1, 1]
    return (target[2], target[1], target[0], 1, 1)
  raise KeyError(transform)


def original_manifest(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every key and shape of an original LatentDiffusion checkpoint of this config."""
  shapes: dict[str, tuple[int, ...]] = {}
  targets = common.target_shapes(unet3d.abstract(cfg.unet))
  for p, r in unet_table.original_table(targets).items():
    shapes["model.diffusion_model." + r.source] = source_shape(r.transform, targets[p][0])
  targets = common.target_shapes(vae.abstract(cfg.vae))
  for p, r in vae_table.ldm_table(cfg.vae).items():
    shapes["first_stage_model." + r.source] = source_shape(r.transform, targets[p][0])
  targets = text_table.targets_of(cfg.text)
  for p, r in text_table.table(cfg.text, "open_clip", targets).items():
    key, _, part = r.source.partition("#")  # in_proj rows q|k|v are one tensor
    shp = source_shape(r.transform, targets[p][0])
    if part:
      shp = (3 * shp[0], *shp[1:])
    shapes[text_table.ORIGINAL_PREFIX + key] = shp
  w = cfg.text.width
  shapes[text_table.ORIGINAL_PREFIX + "text_projection"] = (w, w)
  shapes[text_table.ORIGINAL_PREFIX + "logit_scale"] = ()
  for k, v in sampling.schedule().items():
    shapes[k] = tuple(v.shape)
  return shapes


def original_state_dict(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
  g = torch.Generator().manual_seed(seed)
  sd = {}
  sched = sampling.schedule()
  for k, shp in original_manifest(cfg).items():
    if k in sched:
      sd[k] = torch.from_numpy(np.asarray(sched[k], np.float32)).to(dtype)
    else:
      fan_in = int(np.prod(shp[1:])) if len(shp) >= 2 else 1
      sd[k] = (torch.randn(shp, generator=g) / np.sqrt(fan_in)).to(dtype)
  return sd
