"""The abstract models (shapes only) that loading and random weights start from."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from vinf_jax.config import TINY
from vinf_jax.models import abstract_model, text_encoder, unet3d, vae


@pytest.mark.parametrize(
  "cls, cfg",
  [(unet3d.UNet3D, TINY.unet), (vae.AutoencoderKL, TINY.vae), (text_encoder.TextEncoder, TINY.text)],
  ids=["unet", "vae", "text"],
)
def test_abstract_model_is_the_models_graph(cls, cfg):
  """abstract_model traces with a constant key instead of nnx.Rngs (seconds faster): the same graph, the
  same variables with the same shapes and dtypes as nnx.eval_shape with real RNG streams."""
  g_fast, s_fast = nnx.split(abstract_model(cls, cfg))
  g_ref, s_ref = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
  assert g_fast == g_ref

  def shapes(state):
    return jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(state))

  assert shapes(s_fast) == shapes(s_ref)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.to_pure_dict(s_fast)))
