"""Text-encoder key tables: Flax path -> OpenCLIP key (VideoCrafter2's checkpoint) or transformers key.

Two source layouts (:data:`LAYOUTS`):

* ``open_clip``: the original checkpoint, keys relative to ``cond_stage_model.model.``
  (:data:`ORIGINAL_PREFIX`): ``token_embedding.weight``, ``positional_embedding``,
  ``transformer.resblocks.{i}.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}.*``, ``ln_final.*``, plus
  ``text_projection`` and ``logit_scale``;
* ``hf``: transformers' ``CLIPTextModel`` (the SD2 / zeroscope text encoder), keys with or without
  the ``text_model.`` prefix (transformers 4 writes it, 5 does not): ``embeddings.*``,
  ``encoder.layers.{i}.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}.*``,
  ``final_layer_norm.*``. It stores only the layers it runs (23 for SD2): convert it into a model built
  with :func:`config_for_sources` (``layers`` = the layers found).

Strictness stays that of :mod:`convert.common` (every source used once, every parameter filled once,
shapes checked). Two source tensors do not map one to one, and :func:`expand_sources` makes them do,
by name, before the engine sees them:

* ``attn.in_proj_weight`` [3w, w] / ``attn.in_proj_bias`` [3w] hold q|k|v row blocks. Each becomes
  three virtual sources ``...in_proj_weight#q``, ``#k``, ``#v`` (lazy row slices of the one tensor),
  each used exactly once; the original key counts as used when all three slices are.
* ``text_projection`` and ``logit_scale`` (:data:`ORIGINAL_UNUSED`) are unused by VideoCrafter2: they
  are required to be present (with their expected rank), then dropped, never loaded. transformers'
  old ``embeddings.position_ids`` buffer (:data:`HF_OPTIONAL_BUFFERS`) is dropped when present.

No change to ``convert/common.py`` is needed: the virtual keys only need the existing ``linear`` and
``identity`` transforms.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

import numpy as np

from convert import common
from convert.common import Path, Rule, SourceTensor
from vinf_jax.config import VIDEOCRAFTER2, TextConfig, to_dtype
from vinf_jax.models import text_encoder

STAGE_PREFIX = "cond_stage_model."
ORIGINAL_PREFIX = "cond_stage_model.model."
HF_PREFIX = "text_model."
LAYOUTS = ("open_clip", "hf")

# Stored in VideoCrafter2's checkpoint but unused (the penultimate-layer features go to the UNet
# unprojected): required, then dropped by name. Shapes: text_projection [width, embed_dim], logit_scale [].
ORIGINAL_UNUSED = ("text_projection", "logit_scale")
# An int64 arange(77) buffer that transformers < 4.31 persisted: dropped by name when present.
HF_OPTIONAL_BUFFERS = ("embeddings.position_ids",)

QKV = ("q", "k", "v")  # row order of nn.MultiheadAttention's in_proj
_IN_PROJ = re.compile(r"^transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias)$")
_OPEN_CLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_HF_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_BLOCK = {  # flax module path inside resblocks[i] -> (open_clip name, transformers name)
  ("ln_1",): ("ln_1", "layer_norm1"),
  ("ln_2",): ("ln_2", "layer_norm2"),
  ("attn", "out_proj"): ("attn.out_proj", "self_attn.out_proj"),
  ("mlp", "c_fc"): ("mlp.c_fc", "mlp.fc1"),
  ("mlp", "c_proj"): ("mlp.c_proj", "mlp.fc2"),
}

S = TypeVar("S", SourceTensor, tuple)


@functools.cache
def _targets(cfg: TextConfig) -> dict[Path, tuple]:
  return common.target_shapes(text_encoder.abstract(cfg))


def targets_of(cfg: TextConfig) -> dict[Path, tuple]:
  """``common.target_shapes`` of the abstract ``TextEncoder(cfg)`` (cached: the full size takes ~1 s)."""
  return dict(_targets(cfg))


def source_rule(path: Path, layout: str) -> Rule:
  """Flax parameter path -> Rule(source key, transform) in ``layout`` (see the module docstring)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}, expected one of {LAYOUTS}")
  hf = layout == "hf"
  head, leaf = path[0], path[-1]
  transform = "linear" if leaf == "kernel" else "identity"  # Embed tables are stored [vocab, w] as in torch
  if path == ("token_embedding", "embedding"):
    return Rule("embeddings.token_embedding.weight" if hf else "token_embedding.weight")
  if path == ("positional_embedding",):
    return Rule("embeddings.position_embedding.weight" if hf else "positional_embedding")
  if head == "ln_final" and len(path) == 2:
    return Rule(f"{'final_layer_norm' if hf else 'ln_final'}.{_LEAF[leaf]}")
  if head == "resblocks" and len(path) >= 4:
    i, mod = path[1], tuple(path[2:-1])
    block = f"encoder.layers.{i}" if hf else f"transformer.resblocks.{i}"
    if mod in _BLOCK:
      return Rule(f"{block}.{_BLOCK[mod][hf]}.{_LEAF[leaf]}", transform)
    if mod in (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")):
      qkv = mod[1][0]
      if hf:
        return Rule(f"{block}.self_attn.{qkv}_proj.{_LEAF[leaf]}", transform)
      return Rule(f"{block}.attn.in_proj_{_LEAF[leaf]}#{qkv}", transform)
  raise KeyError(f"no {layout} key for text-encoder parameter {common.path_str(path)!r}")


def table(cfg: TextConfig, layout: str = "open_clip", targets: Mapping[Path, tuple] | None = None) -> dict[Path, Rule]:
  """{flax path: Rule} for every parameter of ``TextEncoder(cfg)`` (generated from the abstract model).

  ``targets``: ``common.target_shapes`` of that model, when the caller already has it.
  """
  targets = targets_of(cfg) if targets is None else targets
  return {p: source_rule(p, layout) for p in targets}


def original_table(cfg: TextConfig) -> dict[Path, Rule]:
  """The table for VideoCrafter2's keys (relative to ``cond_stage_model.model.``; in_proj pre-split)."""
  return table(cfg, "open_clip")


def hf_table(cfg: TextConfig) -> dict[Path, Rule]:
  """The table for transformers ``CLIPTextModel`` keys (``text_model.`` stripped); ``cfg.layers`` layers."""
  return table(cfg, "hf")


def detect_layout(keys: Iterable[str]) -> str:
  """'open_clip' or 'hf' from the key names (prefixes already stripped, ``text_model.`` optional)."""
  keys = list(keys)
  if any(k.startswith("transformer.resblocks.") for k in keys):
    return "open_clip"
  if any(k.startswith(("encoder.layers.", HF_PREFIX + "encoder.layers.")) for k in keys):
    return "hf"
  raise common.ConversionError(
    "text encoder: keys are neither OpenCLIP (transformer.resblocks.*) nor "
    "transformers CLIPTextModel (encoder.layers.*)"
  )


def _shape(src: SourceTensor | tuple) -> tuple[int, ...]:
  return tuple(src.shape) if isinstance(src, SourceTensor) else tuple(int(d) for d in src)


def _row_block(src: S, i: int, n: int) -> S:
  """Rows [i*n, (i+1)*n) of ``src`` (a lazy tensor, or just a shape)."""
  shape = (n, *_shape(src)[1:])
  if isinstance(src, SourceTensor):
    rows = lambda src=src, i=i, n=n: np.asarray(src.load())[i * n : (i + 1) * n]
    return SourceTensor(shape, rows, src.stored_dtype)
  return shape


def expand_sources(sources: Mapping[str, S], cfg: TextConfig, layout: str) -> dict[str, S]:
  """Make the sources map one to one onto :func:`table`: split in_proj q|k|v, drop the unused tensors.

  Args:
    sources: key -> :class:`SourceTensor` or shape; open_clip keys relative to :data:`ORIGINAL_PREFIX`,
      or transformers keys with or without ``text_model.``.
    cfg: the text config (the width of ``text_projection`` is checked against it).
    layout: one of :data:`LAYOUTS`.

  Raises:
    common.ConversionError: a required unused tensor is missing or of the wrong rank, an in_proj has a
      row count not divisible by 3, or transformers keys mix prefixed and unprefixed names.
  """
  errors, out = [], {}
  if layout == "hf":
    for k, v in sources.items():
      name = k[len(HF_PREFIX) :] if k.startswith(HF_PREFIX) else k
      if name in out:
        errors.append(f"{k}: given both with and without the {HF_PREFIX!r} prefix")
      elif name not in HF_OPTIONAL_BUFFERS:
        out[name] = v
  elif layout == "open_clip":
    want_rank = {"text_projection": lambda s: len(s) == 2 and s[0] == cfg.width, "logit_scale": lambda s: s == ()}
    for name in ORIGINAL_UNUSED:
      if name not in sources:
        errors.append(f"{name}: missing (stored, unused by VideoCrafter2, dropped by name)")
      elif not want_rank[name](_shape(sources[name])):
        errors.append(
          f"{name}: shape {_shape(sources[name])}, expected "
          + (f"({cfg.width}, embed_dim)" if name == "text_projection" else "()")
        )
    for k, v in sources.items():
      if k in ORIGINAL_UNUSED:
        continue
      if _IN_PROJ.match(k):
        rows = _shape(v)[0] if _shape(v) else 0
        if rows % 3:
          errors.append(f"{k}: shape {_shape(v)}, expected 3*width rows (q|k|v)")
          continue
        out.update({f"{k}#{qkv}": _row_block(v, j, rows // 3) for j, qkv in enumerate(QKV)})
      else:
        out[k] = v
  else:
    raise ValueError(f"layout={layout!r}, expected one of {LAYOUTS}")
  if errors:
    raise common.ConversionError(f"text encoder ({layout} keys):\n  - " + "\n  - ".join(errors))
  return out


def stage_sources(checkpoint: Mapping[str, S]) -> dict[str, S]:
  """The ``cond_stage_model.*`` entries of a whole checkpoint, relative to :data:`ORIGINAL_PREFIX`.

  Keys under ``cond_stage_model.`` but outside ``cond_stage_model.model.`` keep their full name, so the
  strict check reports them as unexpected instead of ignoring them.
  """
  return {
    (k[len(ORIGINAL_PREFIX) :] if k.startswith(ORIGINAL_PREFIX) else k): v
    for k, v in checkpoint.items()
    if k.startswith(STAGE_PREFIX)
  }


def _num_layers(keys: Iterable[str], layout: str) -> int:
  pat = _HF_LAYER if layout == "hf" else _OPEN_CLIP_LAYER
  idx = [int(m.group(1)) for k in keys if (m := pat.match(k))]
  return max(idx) + 1 if idx else 0


def config_for_sources(cfg: TextConfig, keys: Iterable[str], layout: str | None = None) -> TextConfig:
  """The config to convert these sources into.

  OpenCLIP checkpoints store every layer of the tower: ``cfg`` itself (24 layers for VideoCrafter2).
  transformers' ``CLIPTextModel`` stores the layers it runs: ``cfg`` with ``layers`` = the layers found
  (23 for SD2 / zeroscope; ``layers_used`` unchanged, so the features are the same).

  Raises:
    common.ConversionError: the transformers checkpoint has fewer layers than ``cfg.layers_used``.
  """
  keys = list(keys)
  layout = layout or detect_layout(keys)
  if layout != "hf":
    return cfg
  n = _num_layers(keys, layout)
  if n < cfg.layers_used:
    raise common.ConversionError(
      f"text encoder (hf keys): {n} layers found, the model runs layers_used={cfg.layers_used}"
    )
  return dataclasses.replace(cfg, layers=n)


def convert_text(sources: Mapping[str, SourceTensor], cfg: TextConfig, *, layout: str | None = None) -> dict:
  """Strictly convert text-encoder tensors into the nested parameter dict of ``text_encoder.from_params``.

  Args:
    sources: key -> lazy tensor: open_clip keys relative to ``cond_stage_model.model.`` (see
      :func:`stage_sources`), or transformers ``CLIPTextModel`` keys.
    cfg: the config the parameters are for; for transformers keys, :func:`config_for_sources`.
    layout: one of :data:`LAYOUTS`, or None to detect it from the keys.

  Raises:
    common.ConversionError: listing missing, unexpected and mis-shaped keys.
  """
  layout = layout or detect_layout(sources)
  targets = targets_of(cfg)
  return common.convert(
    table(cfg, layout, targets),
    targets,
    expand_sources(sources, cfg, layout),
    to_dtype(cfg.param_dtype),
    f"text encoder ({layout} keys)",
  )


def check_manifest_text(manifest_shapes: Mapping[str, object], cfg: TextConfig = VIDEOCRAFTER2.text) -> int:
  """Map the ``cond_stage_model.*`` keys of a checkpoint manifest onto the abstract text encoder.

  Args:
    manifest_shapes: full checkpoint key -> shape (list or tuple), e.g. the ``"tensors"`` entry of
      ``convert/manifests/videocrafter2_state_dict.json``; keys outside ``cond_stage_model.`` are ignored.
    cfg: the text config (the full-size VideoCrafter2 text tower by default).

  Returns:
    The number of ``cond_stage_model.*`` tensors accounted for: all of them (294 for VideoCrafter2:
    292 loaded, in_proj counted once, plus ``text_projection`` and ``logit_scale`` dropped by name).

  Raises:
    common.ConversionError: naming every missing, unexpected or mis-shaped key.
  """
  stage = stage_sources({k: tuple(int(d) for d in s) for k, s in manifest_shapes.items()})
  targets = targets_of(cfg)
  common.check_table(
    table(cfg, "open_clip", targets),
    targets,
    expand_sources(stage, cfg, "open_clip"),
    f"text encoder ({STAGE_PREFIX}* keys)",
  )
  return len(stage)
