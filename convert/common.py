"""Strict conversion engine: a target-path -> (source key, transform) table applied to lazy tensors.

Every source tensor must be used exactly once, every target parameter filled exactly once, and every
shape must match after its transform; otherwise :class:`ConversionError` lists the offending keys
(the first few of each kind, with counts). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

Path = tuple  # flax parameter path, e.g. ('input_blocks', 1, 0, 'in_conv', 'kernel')


def path_str(path: Path) -> str:
  return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class SourceTensor:
  """A tensor of the source checkpoint, read only when needed (keeps peak memory at one tensor)."""

  shape: tuple[int, ...]
  load: Callable[[], np.ndarray]  # returns float32 (or the stored dtype) numpy
  stored_dtype: str = "float32"  # as stored in the file (a half-precision file rounds every value)


@dataclasses.dataclass(frozen=True)
class Rule:
  source: str
  transform: str = "identity"


def _conv_nd_to_hwio(w: np.ndarray) -> np.ndarray:  # [O, I, *k] -> [*k, I, O]
  return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


# Named transforms (source layout -> Flax layout) and the shape each one produces.
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
  "identity": lambda w: w,
  "linear": lambda w: w.T,  # [out, in] -> [in, out]
  "conv": _conv_nd_to_hwio,  # Conv2d [O,I,kh,kw] -> [kh,kw,I,O]
  # np.squeeze raises unless the dropped axes have size 1, so a 3x3 kernel is never cropped silently
  "conv1d_as_linear": lambda w: np.squeeze(w, axis=2).T,  # Conv1d [O,I,1] -> Dense [I,O]
  "conv1x1_as_linear": lambda w: np.squeeze(w, axis=(2, 3)).T,  # Conv2d [O,I,1,1] -> Dense [I,O]
  "temporal_conv": lambda w: np.transpose(np.squeeze(w, axis=(3, 4)), (2, 1, 0)),  # Conv3d [O,I,3,1,1] -> [3,I,O]
}


def transformed_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...] | str:
  """The shape after ``transform``, or a message when the transform does not apply to ``shape``."""
  try:
    return tuple(TRANSFORMS[transform](np.empty(shape, np.uint8)).shape)
  except (ValueError, IndexError, np.exceptions.AxisError) as e:
    return f"not a valid input ({e})"


class ConversionError(ValueError):
  pass


def _listing(title: str, items: list[str], limit: int = 8) -> str:
  head = "\n      ".join(items[:limit])
  more = f"\n      ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {len(items)} {title}:\n      {head}{more}"


def target_shapes(abstract_model: nnx.Module) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """Flat {path: (shape, dtype)} of a model's parameters (abstract: nothing allocated)."""
  state = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  out = {}
  for kp, leaf in flat:
    path = tuple(k.key if hasattr(k, "key") else k.idx for k in kp)
    out[path] = (tuple(leaf.shape), leaf.dtype)
  return out


def check_table(
  table: Mapping[Path, Rule], targets: Mapping[Path, tuple], sources: Mapping[str, tuple[int, ...]], what: str
) -> None:
  """Raise ConversionError unless the table maps ``sources`` onto ``targets`` one to one with matching shapes."""
  errors = []
  no_rule = [path_str(p) for p in targets if p not in table]
  no_target = [path_str(p) for p in table if p not in targets]
  missing = sorted({r.source for r in table.values() if r.source not in sources})
  used: dict[str, int] = {}
  for r in table.values():
    used[r.source] = used.get(r.source, 0) + 1
  twice = sorted(k for k, n in used.items() if n > 1)
  unexpected = sorted(k for k in sources if k not in used)
  bad_shape = []
  for p, r in table.items():
    if p in targets and r.source in sources:
      got = transformed_shape(r.transform, tuple(sources[r.source]))
      if got != tuple(targets[p][0]):
        bad_shape.append(
          f"{r.source} {tuple(sources[r.source])} -> {path_str(p)}: "
          f"{got} after '{r.transform}', expected {tuple(targets[p][0])}"
        )
  for title, items in (
    ("missing source keys", missing),
    ("unexpected source keys", unexpected),
    ("mis-shaped tensors", bad_shape),
    ("parameters without a rule", no_rule),
    ("rules for parameters the model lacks", no_target),
    ("source keys used more than once", twice),
  ):
    if items:
      errors.append(_listing(title, items))
  if errors:
    raise ConversionError(f"{what}: the checkpoint does not match the model\n" + "\n".join(errors))


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_float_sources(sources: Mapping[str, SourceTensor], what: str) -> None:
  """Raise ConversionError listing every tensor not stored as a real floating-point dtype (an int, bool or
  complex tensor where a weight should be means the file is not the checkpoint it claims to be)."""
  bad = sorted(f"{k} ({s.stored_dtype})" for k, s in sources.items() if s.stored_dtype not in FLOAT_DTYPES)
  if bad:
    raise ConversionError(
      f"{what}: weights must be floating point ({', '.join(FLOAT_DTYPES)})\n"
      + _listing("tensors of another dtype", bad)
    )


def convert(
  table: Mapping[Path, Rule], targets: Mapping[Path, tuple], sources: Mapping[str, SourceTensor], dtype, what: str
) -> dict:
  """Check, then build the nested parameter dict (numpy, ``dtype``) one tensor at a time.

  Besides the table's checks, every source must be stored as floating point (checked before anything
  is loaded) and hold only finite values, also after the cast to ``dtype`` (checked as each is loaded;
  the error lists every offending key).
  """
  check_table(table, targets, {k: s.shape for k, s in sources.items()}, what)
  check_float_sources({r.source: sources[r.source] for r in table.values()}, what)
  nested: dict = {}
  not_finite, overflow = [], []
  for path, rule in table.items():
    w = TRANSFORMS[rule.transform](np.asarray(sources[rule.source].load()))
    with np.errstate(over="ignore"):  # an overflow is reported below, by key
      cast = np.ascontiguousarray(w.astype(dtype))
    if not np.isfinite(w).all():
      not_finite.append(f"{rule.source}: {int(np.size(w) - np.isfinite(w).sum())} of {np.size(w)} values")
    elif not np.isfinite(cast).all():
      overflow.append(f"{rule.source}: max |value| {float(np.abs(w).max()):.4g}")
    node = nested
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = cast
  errors = []
  if not_finite:
    errors.append(_listing("tensors holding NaN or inf", not_finite))
  if overflow:
    errors.append(_listing(f"tensors that overflow {np.dtype(dtype).name} (store them as float32)", overflow))
  if errors:
    raise ConversionError(f"{what}: the weights must be finite\n" + "\n".join(errors))
  return nested


def prefixed(sources: Mapping[str, SourceTensor], prefix: str) -> dict[str, SourceTensor]:
  """The sources under ``prefix``, with the prefix stripped."""
  return {k[len(prefix) :]: v for k, v in sources.items() if k.startswith(prefix)}


def keys_under(keys: Iterable[str], prefix: str) -> list[str]:
  return [k for k in keys if k.startswith(prefix)]
