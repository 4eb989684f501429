"""The three models of a VideoCrafter2 checkpoint, one per file."""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx


class _ShapeOnlyRngs:
  """Stands in for ``nnx.Rngs`` where only shapes matter: every stream gives the same constant key.

  With ``nnx.Rngs`` each draw updates the stream's counter Variable, and under ``eval_shape`` the counter is
  a tracer whose ``.sharding`` Flax reads on every update; jax answers that with an AttributeError whose
  message scans the whole traced program (``find_progenitors``): quadratic, 13 s for the tiny UNet (jax
  0.10.2, flax 0.12.8). A constant key has no counter: 0.9 s, the same graph and shapes.
  """

  def __getattr__(self, name):
    return self[name]

  def __getitem__(self, name):
    return lambda: jax.random.key(0)


@functools.cache
def _abstract_split(cls, cfg):
  # done once per (class, config)
  return nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=_ShapeOnlyRngs())))


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
