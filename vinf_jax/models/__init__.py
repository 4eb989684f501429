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


def tame_residuals(model: nnx.Module, scale: float = 0.2) -> nnx.Module:
  """``model`` with the output kernels of its residual branches scaled by ``scale`` (random weights only).

  Random weights make every residual branch as large as its input, so a 3D UNet's activations grow through
  its ~30 residual blocks and rounding (float32 summation order, bf16 storage) is amplified chaotically;
  trained networks have small branches (their output convs are even zero-initialised). Scaling the last
  kernel of each branch (``out_conv``, ``proj_out``, ``conv4``, ``to_out`` and the feed-forward's ``out``) gives
  a well-conditioned random network, for tests and numerical checks that compare two ways of computing it.
  """
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)

  def scaled(path, x):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    branch_out = any(s in names for s in ("out_conv", "proj_out", "conv4", "to_out")) or names[-2:-1] == ["out"]
    return x * scale if branch_out and names[-1] == "kernel" else x

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(scaled, pure))
  return nnx.merge(graphdef, state)
