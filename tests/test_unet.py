"""The UNet against diffusers' UNet3DConditionModel, and the UNet key tables against the references."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from convert import common, unet_table
from convert.manifests import MANIFESTS
from convert.torch_io import torch_sources
from tests._unet_reference import ReferenceUNet
from vinf_jax.config import TINY, VIDEOCRAFTER2
from vinf_jax.models import unet3d

DATA = pathlib.Path(__file__).resolve().parent / "data"  # reference files the tests read
# float32 end to end on CPU; the two implementations differ only in summation order.
RTOL = 1e-5
# One jitted function for every test, so each input shape compiles once.
_eps = jax.jit(lambda m, x, t, ctx, fps: m(x, t, ctx, fps))


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.fixture(scope="module")
def reference():
  return ReferenceUNet(TINY.unet, seed=3)


def _original_layout(diffusers_sd, cfg):
  """The same weights under the original VideoCrafter2 keys (init_attn projections as Conv1d)."""
  inverse = {}
  targets = common.target_shapes(unet3d.abstract(cfg))
  for path in targets:
    orig = unet_table.original_key(path)
    inverse[orig] = unet_table.diffusers_key(orig, cfg)
  out = {}
  for orig, diff in inverse.items():
    w = diffusers_sd[diff]
    if orig.startswith("init_attn.0.proj_") and orig.endswith("weight"):
      w = w[:, :, None]
    out[orig] = w
  return out


def _load(cfg, table_fn, sd):
  model = unet3d.abstract(cfg)
  targets = common.target_shapes(model)
  params = common.convert(table_fn(targets), targets, torch_sources(sd), np.float32, "unet")
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def models(reference):
  cfg = TINY.unet
  sd = reference.state_dict_for_conversion()
  return {
    "diffusers": _load(cfg, lambda tg: unet_table.diffusers_table(tg, cfg), sd),
    "original": _load(cfg, unet_table.original_table, _original_layout(sd, cfg)),
  }


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("frames,t", [(1, 981), (3, 500), (8, 1)])
def test_parity_with_diffusers(reference, models, layout, frames, t):
  rng = np.random.default_rng(frames * 1000 + t)
  b, h, w = 2, 16, 16
  x = rng.standard_normal((b, frames, h, w, 4), dtype=np.float32)
  ctx = rng.standard_normal((b, 77, TINY.unet.context_dim), dtype=np.float32)
  ts = np.array([t, max(t - 100, 0)], np.int64)
  fps = np.array([28, 8], np.int64)
  want = reference(x, ts, ctx, fps)
  got = _eps(models[layout], x, ts, ctx, fps)
  err = rel_err(got, want)
  print(f"{layout} frames={frames} t={t}: rel err {err:.2e}")
  assert err <= RTOL, err


def test_fps_embedding_changes_output(models):
  """The fps path is live (and so covered by the parity test): a different fps changes eps."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 1, 16, 16, 4), dtype=np.float32)
  ctx = rng.standard_normal((2, 77, TINY.unet.context_dim), dtype=np.float32)
  m = models["original"]
  a, b = (
    _eps(m, x, np.array([500, 500]), ctx, np.array([8, 8])),
    _eps(m, x, np.array([500, 500]), ctx, np.array([28, 28])),
  )
  assert rel_err(a, b) > 1e-3


@pytest.fixture(scope="module")
def full_size():
  return unet3d.abstract(VIDEOCRAFTER2.unet)


def test_full_size_parameter_count(full_size):
  model = full_size
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 1_413_284_420


def test_tables_match_reference_manifest_and_diffusers_map(full_size):
  cfg = VIDEOCRAFTER2.unet
  targets = common.target_shapes(full_size)
  manifest = json.loads((MANIFESTS / "videocrafter2_state_dict.json").read_text())["tensors"]
  pre = "model.diffusion_model."
  sources = {k[len(pre) :]: tuple(v) for k, v in manifest.items() if k.startswith(pre)}
  assert len(sources) == 1484
  common.check_table(unet_table.original_table(targets), targets, sources, "unet")  # raises on any mismatch
  ref = json.loads((DATA / "vc2_to_diffusers_unet_map.json").read_text())
  mine = {unet_table.original_key(p): unet_table.diffusers_key(unet_table.original_key(p), cfg) for p in targets}
  assert mine == {k: v[0] for k, v in ref.items()}
  # init_attn's projections are the only tensors whose layout differs (Conv1d vs Linear)
  assert sorted(k for k, v in ref.items() if v[1]) == ["init_attn.0.proj_in.weight", "init_attn.0.proj_out.weight"]
