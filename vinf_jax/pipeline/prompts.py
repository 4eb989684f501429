"""The text of a video: prompts encoded once, and each frame's text embedding laid out over the mesh.

Prompt i covers the i-th equal segment of the frames (:func:`prompt_weights`, optionally with linear
transitions); :func:`encode_prompts` runs the text encoder once on every prompt and the negative prompt;
:func:`frame_contexts` builds each device's per-frame embeddings where they lie.
"""

from __future__ import annotations

import functools

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


def encode_prompts(text_encoder, tokenize, prompts: list[str]) -> np.ndarray:
  """``[len(prompts), 77, width]`` float32 penultimate-layer features (one jitted call).

  The program is JAX's to keep (the structure is a static argument): the next request with as many prompts
  reuses it. A new ``jax.jit`` per call compiled the text encoder again for every video (1.6 s a request of
  the page on an H200, a third of a 64-frame 10-step request).
  """
  from flax import nnx

  tokens = np.asarray(tokenize(list(prompts)), np.int32)
  graphdef, params = nnx.split(text_encoder)
  return np.asarray(_apply_text_encoder(graphdef, params, tokens), np.float32)


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
