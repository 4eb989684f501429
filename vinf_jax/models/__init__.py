"""The three models of a VideoCrafter2 checkpoint, one per file."""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx


@functools.cache
def _abstract_split(cls, cfg):
  # nnx.eval_shape of a model takes seconds (the tiny UNet ~13 s on CPU): done once per (class, config).
  return nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))


def abstract_model(cls, cfg):
  """``cls(cfg)`` with ShapeDtypeStructs instead of arrays (nothing allocated); a fresh model each call.

  The shapes are traced once per ``(cls, cfg)`` (configs are frozen dataclasses) and cached; every caller
  gets its own copy of the state, so filling one model (``nnx.replace_by_pure_dict``) leaves the cache alone.
  """
  graphdef, state = _abstract_split(cls, cfg)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def param_count(model: nnx.Module) -> int:
  """Parameters of ``model`` (abstract or concrete)."""
  return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
