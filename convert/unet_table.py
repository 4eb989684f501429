"""UNet key tables: Flax path -> original VideoCrafter2 key -> diffusers key, generated from the config.

The original keys are those of ``model.diffusion_model.*`` (prefix stripped); the diffusers keys are
those of the ``UNet3DConditionModel``-based port (``adamdad/videocrafterv2_diffusers``; architecture
notes, section 10.2). Transforms are chosen from the target's rank: a Dense kernel (2-D) is
``linear``, a 2D conv (4-D) ``conv``, a temporal Conv3d kernel (3-D) ``temporal_conv``; ``init_attn``'s
projections are Conv1d in the original checkpoint.
"""

from __future__ import annotations

import re

from convert.common import Path, Rule
from vinf_jax.config import UNetConfig

_RES = {
  "in_norm": "in_layers.0",
  "in_conv": "in_layers.2",
  "emb_proj": "emb_layers.1",
  "out_norm": "out_layers.0",
  "out_conv": "out_layers.3",
  "skip_connection": "skip_connection",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_TOP = {"time_embed": "time_embed", "fps_embedding": "fps_embedding", "out_norm": "out.0", "out_conv": "out.2"}
_MLP = {"linear_1": "0", "linear_2": "2"}
TURBO_KEYS = ("time_cond_proj", "motion_cond_proj", "combine_proj")


def _inner(parts: list[str]) -> list[str]:
  """Rename module names inside a block (ResBlock, transformers, temporal conv, resampling)."""
  out = []
  i = 0
  while i < len(parts):
    p = parts[i]
    if p in _RES:  # only ResBlocks use these names (the UNet's own out_norm/out_conv are handled earlier)
      out.append(_RES[p])
    elif p == "temopral_conv":  # sic
      stage, sub = parts[i + 1], parts[i + 2]  # conv1..4, norm|conv
      idx = "0" if sub == "norm" else ("2" if stage == "conv1" else "3")
      out += ["temopral_conv", stage, idx]
      i += 2
    elif p == "to_out":
      out += ["to_out", "0"]
    elif p == "ff":
      out += ["ff", "net", "0", "proj"] if parts[i + 1] == "proj" else ["ff", "net", "2"]
      i += 1
    else:
      out.append(p)
    i += 1
  return out


def original_key(path: Path) -> str:
  """Flax parameter path -> key of ``model.diffusion_model`` (prefix stripped)."""
  parts = [str(p) for p in path]
  leaf = _LEAF[parts[-1]]
  head, rest = parts[0], parts[:-1]
  if head in TURBO_KEYS:  # T2V-Turbo's conditioning projections: Linear without bias, at the top level
    return f"{head}.{leaf}"
  if head in ("time_embed", "fps_embedding"):
    return f"{head}.{_MLP[rest[1]]}.{leaf}"
  if head in ("out_norm", "out_conv"):
    return f"{_TOP[head]}.{leaf}"
  if head == "input_blocks" and rest[1] == "0":
    return f"input_blocks.0.0.{leaf}"
  return ".".join(_inner(rest) + [leaf])


def transform_for(path: Path, ndim: int, original: bool) -> str:
  if path[-1] != "kernel":
    return "identity"
  if ndim == 3:
    return "temporal_conv"
  if ndim == 4:
    return "conv"
  if original and path[0] == "init_attn" and path[2] in ("proj_in", "proj_out"):
    return "conv1d_as_linear"
  return "linear"


_DIFF_RES = {
  "in_layers.0": "norm1",
  "in_layers.2": "conv1",
  "emb_layers.1": "time_emb_proj",
  "out_layers.0": "norm2",
  "out_layers.3": "conv2",
  "skip_connection": "conv_shortcut",
}


def _res_rename(sub: str) -> str:
  for a, b in _DIFF_RES.items():
    if sub.startswith(a + "."):
      return b + sub[len(a) :]
  raise KeyError(sub)


def diffusers_key(key: str, cfg: UNetConfig) -> str:
  """Original UNet key -> diffusers ``UNet3DConditionModel`` (+ fps_embedding) key."""
  nr = cfg.num_res_blocks
  m = re.fullmatch(r"(time_embed|fps_embedding)\.(0|2)\.(\w+)", key)
  if m:
    head = "time_embedding" if m[1] == "time_embed" else "fps_embedding"
    return f"{head}.linear_{1 if m[2] == '0' else 2}.{m[3]}"
  if key == "time_cond_proj.weight":  # UNet3DConditionModel(time_cond_proj_dim=...)
    return "time_embedding.cond_proj.weight"
  if key.split(".")[0] in TURBO_KEYS:
    raise KeyError(f"{key!r} (T2V-Turbo-v2's motion conditioning) has no diffusers UNet3DConditionModel name")
  if key.startswith("input_blocks.0.0."):
    return "conv_in." + key.split(".")[-1]
  if key.startswith("init_attn.0."):
    return "transformer_in." + key[len("init_attn.0.") :]
  if key.startswith("out.0."):
    return "conv_norm_out." + key.split(".")[-1]
  if key.startswith("out.2."):
    return "conv_out." + key.split(".")[-1]

  def layer(prefix: str, j: int, idx: int, sub: str, layers_before_upsample: int | None) -> str:
    if idx == 0:
      if sub.startswith("temopral_conv."):
        return f"{prefix}.temp_convs.{j}.{sub[len('temopral_conv.') :]}"
      return f"{prefix}.resnets.{j}.{_res_rename(sub)}"
    if sub.startswith("conv.") and layers_before_upsample is not None and idx == layers_before_upsample:
      return f"{prefix}.upsamplers.0.{sub}"
    return f"{prefix}.{'attentions' if idx == 1 else 'temp_attentions'}.{j}.{sub}"

  m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key)
  if m:
    n, idx, sub = int(m[1]), int(m[2]), m[3]
    k, j = divmod(n - 1, nr + 1)
    if j == nr:  # the downsample closing level k
      return f"down_blocks.{k}.downsamplers.0.conv.{sub.split('.', 1)[1]}"
    return layer(f"down_blocks.{k}", j, idx, sub, None)
  m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", key)
  if m:
    idx, sub = int(m[1]), m[2]
    if idx in (0, 3):
      return layer("mid_block", 0 if idx == 0 else 1, 0, sub, None)
    return layer("mid_block", 0, idx, sub, None)
  m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key)
  if m:
    n, idx, sub = int(m[1]), int(m[2]), m[3]
    k, j = divmod(n, nr + 1)
    level = len(cfg.channel_mult) - 1 - k
    up_idx = 3 if level in cfg.attention_levels else 1
    return layer(f"up_blocks.{k}", j, idx, sub, up_idx if (j == nr and level > 0) else None)
  raise KeyError(f"no diffusers name for UNet key {key!r}")


def original_table(targets: dict[Path, tuple]) -> dict[Path, Rule]:
  return {p: Rule(original_key(p), transform_for(p, len(s[0]), original=True)) for p, s in targets.items()}


def diffusers_table(targets: dict[Path, tuple], cfg: UNetConfig) -> dict[Path, Rule]:
  return {
    p: Rule(diffusers_key(original_key(p), cfg), transform_for(p, len(s[0]), original=False))
    for p, s in targets.items()
  }
