"""The text of a video: prompts encoded once, and each frame's text embedding laid out over the mesh.

Prompt i covers the i-th equal segment of the frames (:func:`prompt_weights`, optionally with linear
transitions); :func:`encode_prompts` runs the text encoder once on every prompt and the negative prompt;
:func:`frame_contexts` builds each device's per-frame embeddings where they lie.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import numpy as np

from vinf_jax import parallel


def prompt_weights(num_prompts: int, frames: int, transition: int = 0) -> np.ndarray:
  """``[frames, num_prompts]`` float32 weights of each prompt's embedding in each frame's text.

  Prompt i covers frames ``[i*N/P, (i+1)*N/P)`` (frame f belongs to prompt ``floor(f * P / N)``), so the
  segments depend only on the frame count, not on the devices. With ``transition = K > 0`` the weight
  ramps linearly across each boundary b over the K frames around it: frame f (centre ``f + 0.5``) gives
  the next prompt ``clip((f + 0.5 - b) / K + 0.5, 0, 1)``. Rows sum to 1; at most two prompts mix.
  """
  if num_prompts < 1 or frames < 1:
    raise ValueError(f"num_prompts={num_prompts} and frames={frames} must be >= 1")
  c = np.arange(frames, dtype=np.float64) + 0.5
  bounds = np.arange(1, num_prompts) * frames / num_prompts  # [P-1]
  if transition > 0:
    up = np.clip((c[:, None] - bounds[None]) / transition + 0.5, 0.0, 1.0)  # [N, P-1]: past boundary i
  else:
    up = (c[:, None] - 0.5 >= bounds[None]).astype(np.float64)  # frame f starts at or past b
  ones, zeros = np.ones((frames, 1)), np.zeros((frames, 1))
  cum = np.concatenate([ones, up, zeros], axis=1)  # [N, P+1]: "at or past the start of prompt j"
  return (cum[:, :-1] - cum[:, 1:]).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _apply_text_encoder(graphdef, params, tokens):
  from flax import nnx

  return nnx.merge(graphdef, params)(tokens)


_compiled: dict = {}  # (graphdef, rows, the parameters' shapes, dtypes and shardings) -> compiled encoder


def bucket(rows: int) -> int:
  """The rows the text encoder is compiled for: ``rows`` rounded up to a power of two (1 prompt and the
  negative one: 2; 3 prompts: 4), so a program serves every prompt count of its bucket."""
  return 1 << max(0, rows - 1).bit_length()


def text_program(text_encoder, rows: int, length: int) -> tuple[object, Callable, float]:
  """(params, the text encoder compiled for ``bucket(rows)`` rows of ``length`` ids, seconds spent compiling it
  now: 0 when it was compiled before in this process). Ahead of time: a run counts it as compile, not encoding."""
  from flax import nnx

  graphdef, params = nnx.split(text_encoder)
  n = bucket(rows)
  spec = jax.tree.map(lambda a: (a.shape, str(a.dtype), str(getattr(a, "sharding", None))), params)
  key = (graphdef, n, length, str(spec))
  t = time.perf_counter()
  if key not in _compiled:
    _compiled[key] = _apply_text_encoder.lower(graphdef, params, jax.ShapeDtypeStruct((n, length), np.int32)).compile()
  return params, _compiled[key], time.perf_counter() - t


def compiled_count() -> int:
  """How many text encoder programs this process compiled (tests: a request that compiles none)."""
  return len(_compiled)


def encode_prompts(text_encoder, tokenize, prompts: list[str], timings: dict | None = None) -> np.ndarray:
  """``[len(prompts), 77, width]`` float32 penultimate-layer features (one call of a program compiled once
  per :func:`bucket` of prompt counts in a process; ``timings["text_compile"]`` gets the compile's seconds).

  A new ``jax.jit`` per call compiled the text encoder again for every video (1.6 s a request of the page on
  an H200, a third of a 64-frame 10-step request); one program per prompt count, once per count.
  """
  tokens = np.asarray(tokenize(list(prompts)), np.int32)
  params, fn, took = text_program(text_encoder, len(tokens), tokens.shape[1])
  if timings is not None:
    timings["text_compile"] = took
  rows = np.concatenate([tokens, np.repeat(tokens[-1:], bucket(len(tokens)) - len(tokens), axis=0)])
  return np.asarray(fn(params, rows), np.float32)[: len(tokens)]


def truncated(tokenize, prompts: list[str], negative_prompt: str) -> list[dict]:
  """The prompts the text encoder reads only in part (its context holds 77 ids with the start and end):
  ``[{"prompt": i, "tokens": n, "kept": k, "dropped": n - k}]``, ``i`` the index in ``prompts`` or
  ``"negative_prompt"``; empty when all fit (or ``tokenize`` cannot count its tokens)."""
  from vinf_jax import tokenizer

  counts = tokenizer.truncation(tokenize, list(prompts) + [negative_prompt]) or []
  which = [*range(len(prompts)), "negative_prompt"]
  return [
    {"prompt": w, "tokens": n, "kept": n - d, "dropped": d} for w, (n, d) in zip(which, counts, strict=False) if d
  ]


def truncation_warning(cut: list[dict], num_prompts: int) -> str:
  """One line for :func:`truncated`'s list: which prompts were cut, and how many tokens each lost."""

  def name(c: dict) -> str:
    return "the negative prompt" if c["prompt"] == "negative_prompt" else f"prompt {c['prompt'] + 1} of {num_prompts}"

  parts = [f"{name(c)} has {c['tokens']} tokens (the last {c['dropped']} dropped)" for c in cut]
  keep = cut[0]["kept"]
  return (
    f"warning: the text encoder reads the first {keep} tokens of a prompt ({keep + 2} with its start and end) and "
    f"drops the rest: {'; '.join(parts)}; shorten them to keep every word"
  )


def frame_contexts(emb: np.ndarray, weights: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """``[1, N, 77, C]`` per-frame text, split over the mesh; each shard is computed where it lives."""
  n = weights.shape[0]
  shape = (1, n, *emb.shape[1:])
  sharding = jax.sharding.NamedSharding(mesh, parallel.frames_spec())

  def shard(idx):
    w = weights[idx[1]]  # [t, P]: only this shard's frames
    return np.einsum("tp,psc->tsc", w, emb).astype(np.float32)[None]

  return jax.make_array_from_callback(shape, sharding, shard)
