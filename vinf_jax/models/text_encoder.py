"""VideoCrafter2's text encoder: the OpenCLIP ViT-H/14 text tower (``cond_stage_model``) in Flax NNX.

``FrozenOpenCLIPEmbedder`` with ``layer='penultimate'`` (architecture notes, section 5): token and
position embeddings, pre-LN resblocks under a causal mask, of which only the first ``layers_used``
run, then ``ln_final``. All 77 positions go to cross-attention: no pooling, no ``text_projection``,
no padding mask (padding tokens 0 still flow through the tower, causally after the text).

Parameters: all ``cfg.layers`` resblocks are built, so that a converted checkpoint is the whole
stored tower (the original stores 24 and runs 23). transformers' ``CLIPTextModel`` layout (the SD2 /
zeroscope text encoder) stores only the 23 layers it runs: load it into a model built with
``layers = layers_used`` (``convert.text_table.config_for_sources`` derives that config from the
checkpoint's keys); the features are the same. ``text_projection`` and ``logit_scale`` are stored in
the original checkpoint but unused: they are not parameters here, and the converter drops them by
name (``convert.text_table.ORIGINAL_UNUSED``).

Names follow open_clip (``resblocks[i].ln_1``, ``.attn``, ``.mlp.c_fc``, ...), except that
``nn.MultiheadAttention``'s packed ``in_proj`` is held as three Linears ``q_proj/k_proj/v_proj`` (the
converter splits its rows q|k|v), so the module reads as transformers' ``CLIPAttention`` too.

Dtype policy: matmuls in ``cfg.dtype``; LayerNorm statistics and the softmax in float32 (Flax
upcasts both); the output is float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vinf_jax.config import TextConfig, to_dtype
from vinf_jax.models import abstract_model

LN_EPS = 1e-5  # open_clip's nn.LayerNorm default; Flax's default (1e-6) would be a silent parity bug


class Attention(nnx.Module):
  """Causal multi-head self-attention; ``nn.MultiheadAttention``'s in_proj held as q/k/v Linears."""

  def __init__(self, width: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.q_proj = nnx.Linear(width, width, **kw)  # in_proj rows [0, w)
    self.k_proj = nnx.Linear(width, width, **kw)  # in_proj rows [w, 2w)
    self.v_proj = nnx.Linear(width, width, **kw)  # in_proj rows [2w, 3w)
    self.out_proj = nnx.Linear(width, width, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, W] -> [B, L, W]; token i attends to tokens 0..i."""
    b, n, w = x.shape
    split = lambda y: y.reshape(b, n, self.heads, w // self.heads)  # [B, L, H, D]
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    # XLA's path: the tower runs once per prompt, and its softmax is float32 whatever the dtype.
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")  # [B, L, H, D]
    return self.out_proj(o.reshape(b, n, w))


class MLP(nnx.Module):
  """``c_fc`` -> exact (erf) GELU -> ``c_proj``: ViT-H/14 uses nn.GELU, not CLIP's QuickGELU."""

  def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.c_fc = nnx.Linear(width, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.c_proj = nnx.Linear(hidden, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class ResidualAttentionBlock(nnx.Module):
  """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  def __init__(self, width: int, heads: int, mlp_hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = nnx.LayerNorm(width, epsilon=LN_EPS, **kw)
    self.attn = Attention(width, heads, **kw)
    self.ln_2 = nnx.LayerNorm(width, epsilon=LN_EPS, **kw)
    self.mlp = MLP(width, mlp_hidden, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class TextEncoder(nnx.Module):
  """Token ids ``[B, L]`` -> penultimate-layer features after ``ln_final``, ``[B, L, width]`` float32."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dtype, pdt = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdt, rngs=rngs)
    w = cfg.width
    self.token_embedding = nnx.Embed(cfg.vocab_size, w, embedding_init=nnx.initializers.normal(0.02), **kw)
    self.positional_embedding = nnx.Param(0.01 * jax.random.normal(rngs.params(), (cfg.context_length, w), pdt))
    # All stored blocks are parameters; only the first ``layers_used`` run (see the module docstring).
    self.resblocks = nnx.List(
      [ResidualAttentionBlock(w, cfg.heads, w * cfg.mlp_ratio, **kw) for _ in range(cfg.layers)]
    )
    self.ln_final = nnx.LayerNorm(w, epsilon=LN_EPS, **kw)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Encode prompts.

    Args:
      tokens: ``[B, L]`` int token ids, ``L <= context_length`` (77 from the tokenizers), padded with 0.

    Returns:
      ``[B, L, width]`` float32: the output of resblock ``layers_used - 1`` after ``ln_final``.
    """
    cfg = self.cfg
    if tokens.ndim != 2 or tokens.shape[1] > cfg.context_length:
      raise ValueError(f"tokens must be [batch, <= {cfg.context_length}], got shape {tokens.shape}")
    n = tokens.shape[1]
    x = self.token_embedding(tokens)  # [B, L, W]
    x = x + self.positional_embedding[:n].astype(x.dtype)
    for blk in list(self.resblocks)[: cfg.layers_used]:
      x = blk(x)
    return self.ln_final(x).astype(jnp.float32)


def build(cfg: TextConfig, seed: int = 0) -> TextEncoder:
  """A text encoder with random weights (tests, the tiny demo)."""
  return TextEncoder(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: TextConfig) -> TextEncoder:
  """The text encoder with ShapeDtypeStructs instead of arrays: nothing is allocated."""
  return abstract_model(TextEncoder, cfg)


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def from_params(cfg: TextConfig, params: dict[str, Any]) -> TextEncoder:
  """The text encoder holding ``params`` (the nested dict a converter or checkpoint gives); no random init.

  Raises ValueError naming every missing, unexpected or mis-shaped parameter path.
  """
  graphdef, state = nnx.split(abstract(cfg))
  want, got = _flat(nnx.to_pure_dict(state)), _flat(params)
  name = lambda p: "/".join(map(str, p))
  errors = [f"missing {name(p)}" for p in want if p not in got]
  errors += [f"unexpected {name(p)}" for p in got if p not in want]
  errors += [
    f"{name(p)}: shape {tuple(jnp.shape(got[p]))}, expected {tuple(want[p].shape)}"
    for p in want
    if p in got and tuple(jnp.shape(got[p])) != tuple(want[p].shape)
  ]
  if errors:
    raise ValueError("text encoder parameters do not match the model:\n  - " + "\n  - ".join(errors))
  pdt = to_dtype(cfg.param_dtype)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, pdt), params))
  return nnx.merge(graphdef, state)
