"""The models of a run: loaded from converted weights or drawn at random, and the programs kept with them.

:class:`Models` is what the web page, the notebook and the tests hold between videos: the UNet, VAE, text
encoder and tokenizer, and (:attr:`Models.programs`, :mod:`.programs`) the compiled step and decode of the
last settings they ran with.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vinf_jax import checkpoint, parallel
from vinf_jax.config import ModelConfig
from vinf_jax.pipeline.programs import Programs
from vinf_jax.pipeline.progress import log0
from vinf_jax.pipeline.settings import GenerationConfig, Resolved, validate


@dataclasses.dataclass
class Models:
  """The loaded models, plus the compiled programs of the last settings they ran with (:class:`Programs`)."""

  config: ModelConfig
  unet: object
  vae: object
  text_encoder: object
  tokenize: Callable
  programs: Programs = dataclasses.field(default_factory=Programs, repr=False)


def load_models(
  cfg: GenerationConfig,
  plan: Resolved | None = None,
  log: Callable[[str], None] = log0,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> Models:
  """The UNet and VAE in the run's dtype, the text encoder in float32, and the tokenizer.

  The UNet and VAE are placed replicated over ``mesh`` (default: the mesh of ``cfg.num_devices``), where
  the sampling programs use them without a copy. The text encoder runs once per video on a few prompts,
  so it lives on the host's CPU device and takes no accelerator memory. ``plan`` is what :func:`validate`
  returned for ``cfg`` (validated here when None).
  """
  plan = plan or validate(cfg)
  from vinf_jax import tokenizer as tok_lib
  from vinf_jax.models import text_encoder, unet3d, vae

  mesh = mesh or parallel.make_mesh(cfg.num_devices or None)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  host = jax.sharding.SingleDeviceSharding(host_device())
  model = plan.model.with_dtype(plan.dtype)
  text_cfg = dataclasses.replace(model.text, dtype="float32", param_dtype="float32")  # small; keep it exact
  if not cfg.weights:
    log(f"random weights of the {model.name!r} model (seed {cfg.weights_seed}): the video is noise-like")
    return Models(
      config=model,
      unet=random_model(unet3d.UNet3D, model.unet, cfg.weights_seed, sharding=rep),
      vae=random_model(vae.AutoencoderKL, model.vae, cfg.weights_seed + 1, sharding=rep),
      text_encoder=random_model(text_encoder.TextEncoder, text_cfg, cfg.weights_seed + 2, sharding=host),
      tokenize=tok_lib.ByteTokenizer(model.text.context_length),
    )
  path = lambda c: os.path.join(cfg.weights, c)
  return Models(
    config=model,
    unet=checkpoint.load_params(path("unet"), make_abstract=lambda: unet3d.abstract(model.unet), sharding=rep),
    vae=checkpoint.load_params(path("vae"), make_abstract=lambda: vae.abstract(model.vae), sharding=rep),
    text_encoder=checkpoint.load_params(
      path("text_encoder"), make_abstract=lambda: text_encoder.abstract(text_cfg), sharding=host
    ),
    tokenize=tok_lib.load_tokenizer(
      plan.tokenizer_dir, model.text.context_length, model.text.pad_id, model.text.pad_text
    ),
  )


def host_device():
  """The host's CPU device (the first accelerator when JAX runs without a CPU backend)."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the first accelerator then
    return jax.local_devices()[0]


def random_model(cls, cfg, seed: int, *, sharding: jax.sharding.Sharding | None = None):
  """``cls(cfg)`` with random weights drawn on the host with numpy (demo, benchmarks, tests).

  Flax's initialisers run op by op are slow for a thousand parameters (and a jitted initialiser is slower
  still to compile on CPU), so the weights are drawn here: kernels ``N(0, 1 / fan_in)`` (fan-in = every
  axis but the last; the variance of Flax's default LeCun-normal), embeddings ``N(0, 0.02^2)``, the
  position embedding ``N(0, 0.01^2)``, norm scales 1 and biases 0. Deterministic for a seed.
  """
  from flax import nnx

  from vinf_jax.models import abstract_model

  graphdef, state = nnx.split(abstract_model(cls, cfg))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      x = np.ones(a.shape, np.float32)
    elif name == "bias":
      x = np.zeros(a.shape, np.float32)
    else:
      std = {"embedding": 0.02, "positional_embedding": 0.01}.get(name)
      std = std or 1.0 / math.sqrt(max(1, math.prod(a.shape[:-1])))
      x = rng.standard_normal(a.shape, dtype=np.float32) * np.float32(std)
    x = x.astype(a.dtype)  # ml_dtypes: numpy casts to bfloat16 too
    return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)
