"""Orbax save/restore of plain nested parameter dicts, restored into abstract NNX models.

On disk a component is a plain nested dict (string keys, list indices as "0", "1", ...) written by
orbax's StandardCheckpointer; nothing of NNX's object graph is stored, so the files stay readable
by any JAX code. Restoring builds the model abstractly (``nnx.eval_shape``) and fills it, placing
each array directly with the requested sharding (replicated over a mesh, say).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def _str_keys(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _like_keys(tree: Any, ref: Any) -> Any:
  """Give ``tree`` (string keys) the key types of ``ref`` (ints for nnx.List indices)."""
  if isinstance(ref, dict):
    return {k: _like_keys(tree[str(k)], v) for k, v in ref.items()}
  return tree


def save_params(path: str | os.PathLike, params: dict) -> None:
  """Write a nested dict of arrays to ``path`` (which must not exist)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), _str_keys(params))
  ckptr.wait_until_finished()


def param_tree(model: nnx.Module) -> dict:
  """The model's parameters as a nested pure dict (what :func:`save_params` stores)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(
  path: str | os.PathLike, *, make_abstract: Callable[[], nnx.Module], sharding: jax.sharding.Sharding | None = None
) -> nnx.Module:
  """Restore a component saved by :func:`save_params` into a model built by ``make_abstract``.

  Args:
    path: the component's orbax directory.
    make_abstract: returns the abstract model (``nnx.eval_shape`` of its constructor); its parameter
      dtypes decide the restored dtypes (stored float32 weights are cast on the way in).
    sharding: where to place every parameter (default: the first local device).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no converted weights at {path}")
  abstract = make_abstract()
  graphdef, state = nnx.split(abstract)
  ref = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), _str_keys(ref))
  ckptr = ocp.StandardCheckpointer()
  stored = ckptr.metadata(path)
  stored_tree = getattr(stored, "item_metadata", stored)
  try:
    restored = ckptr.restore(path, target)
  except (ValueError, KeyError) as e:
    raise ValueError(
      f"the weights at {path} do not fit the model of this config (stored: {_summary(stored_tree)}): {e}"
    ) from e
  nnx.replace_by_pure_dict(state, _like_keys(restored, ref))
  return nnx.merge(graphdef, state)


def _summary(tree: Any) -> str:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
  n = sum(int(np.prod(x.shape)) for x in leaves if hasattr(x, "shape"))
  return f"{len(leaves)} arrays, {n:,} values"


# ------------------------------------------------------------------------------------------------
# Converted model directories (written by ``python -m convert.videocrafter2``).

CONFIG_FILE = "config.json"


def read_model_dir(path: str | os.PathLike, *, need: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer")):
  """(ModelConfig, components) of a converted directory; errors name what is missing."""
  import json

  path = os.fspath(path)
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(
      f"{path} is not a converted model directory (no {CONFIG_FILE}); "
      "convert weights with `python -m convert.videocrafter2 --ckpt model.ckpt --out DIR`"
    )
  try:
    with open(cfg_file, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"{cfg_file} is not valid JSON (truncated or edited?): {err}") from None
  cfg = _model_config(meta, cfg_file)
  have = meta.get("components", [])
  if not (isinstance(have, list) and all(isinstance(c, str) for c in have)):
    raise ValueError(f"{cfg_file}: 'components' is {have!r}, expected a list of component names")
  unlisted = [c for c in need if c not in have]
  if unlisted:
    raise FileNotFoundError(
      f"converted model directory {path} is incomplete: {CONFIG_FILE} lists the components {have}, "
      f"this run needs {unlisted} too (convert again with --out {path})"
    )
  absent = [c for c in need if not os.path.isdir(os.path.join(path, c))]
  if absent:
    raise FileNotFoundError(
      f"converted model directory {path} is incomplete: {CONFIG_FILE} lists {absent} but the "
      f"folder{'s' if len(absent) > 1 else ''} {', '.join(os.path.join(path, c) for c in absent)} "
      f"{'are' if len(absent) > 1 else 'is'} not there (moved or deleted? convert again with --out {path})"
    )
  return cfg, have


def _model_config(meta, cfg_file: str):
  """The ModelConfig of a converted directory's ``config.json`` content; ValueError naming the bad field."""
  from vinf_jax.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
  from vinf_jax.schedule import Schedule

  if not isinstance(meta, dict):
    raise ValueError(f"{cfg_file} holds a JSON {type(meta).__name__}, expected an object with 'model' and 'components'")
  model = meta.get("model")
  if not isinstance(model, dict):
    raise ValueError(f"{cfg_file}: 'model' is {model!r}, expected an object with name, unet, vae and text")
  for name, klass in (("unet", UNetConfig), ("vae", VAEConfig), ("text", TextConfig), ("schedule", Schedule)):
    sub = model.get(name, {} if name == "schedule" else None)  # no schedule (before issue 26): VideoCrafter2's
    if not isinstance(sub, dict):
      raise ValueError(f"{cfg_file}: 'model.{name}' is {sub!r}, expected an object of {klass.__name__} fields")
    for f in dataclasses.fields(klass):
      default = getattr(klass(), f.name)
      if f.name in sub and not _json_fits(sub[f.name], default):
        kind = type(default).__name__
        raise ValueError(f"{cfg_file}: 'model.{name}.{f.name}' is {sub[f.name]!r}, expected a {kind}")
  if not isinstance(model.get("name"), str):
    raise ValueError(f"{cfg_file}: 'model.name' is {model.get('name')!r}, expected a string")
  for name, default in (("video_size", (16, 320, 512)), ("kind", "")):
    if name in model and not _json_fits(model[name], default):
      raise ValueError(f"{cfg_file}: 'model.{name}' is {model[name]!r}, expected a {type(default).__name__}")
  try:
    cfg = ModelConfig.from_dict(model)
    for part in (cfg.unet, cfg.vae, cfg.text, cfg.schedule):
      part.validate()
  except (ValueError, TypeError, KeyError) as err:  # validate() lists its errors one a line: keep one line
    raise ValueError(f"{cfg_file}: " + str(err).replace(":\n  - ", ": ").replace("\n  - ", "; ")) from None
  return cfg


def _json_fits(value, default) -> bool:
  """A JSON value can stand for a config field whose default is ``default``."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, int | float) and not isinstance(value, bool)
  if isinstance(default, tuple):
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
  return isinstance(value, type(default))
