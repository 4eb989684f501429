"""KL-f8 autoencoder: parity with diffusers' AutoencoderKL through both key tables, chunked decoding,
the full-size parameter count and the checkpoint manifest (CPU, tiny width, float32)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from flax import nnx

from convert import common, vae_table
from convert.manifests import MANIFESTS
from vinf_jax.config import TINY, VIDEOCRAFTER2
from vinf_jax.models import param_count, vae

CFG = TINY.vae  # ch 32, ch_mult (1, 2, 2, 2), one ResnetBlock per level: diffusers (32, 64, 64, 64)
B, T, H, W = 1, 2, 32, 48  # non-square, so a swapped H/W cannot pass
TOL = 1e-5  # max|a - b| / max|b|, float32
CHUNK_TOL = 5e-6  # chunked vs one-shot decode: float32 rounding only (XLA is not batch-size invariant)
MANIFEST = MANIFESTS / "videocrafter2_state_dict.json"


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def reference():
  """A tiny diffusers AutoencoderKL with every parameter random and non-zero, and its outputs."""
  levels = len(CFG.ch_mult)
  torch.manual_seed(0)
  model = DiffusersAutoencoderKL(
    in_channels=CFG.in_channels,
    out_channels=CFG.out_channels,
    down_block_types=("DownEncoderBlock2D",) * levels,
    up_block_types=("UpDecoderBlock2D",) * levels,
    block_out_channels=tuple(CFG.ch * m for m in CFG.ch_mult),
    layers_per_block=CFG.num_res_blocks,
    latent_channels=CFG.z_channels,
    norm_num_groups=CFG.num_groups,
    scaling_factor=CFG.scale_factor,
  ).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim == 1:  # GroupNorm scales (diffusers initialises them to 1)
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  assert all(np.all(v != 0) for v in sd.values())

  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (B, T, H, W, 3)).astype(np.float32)
  z = rng.standard_normal((B, T, H // 8, W // 8, CFG.z_channels)).astype(np.float32)
  with torch.no_grad():
    frames = torch.from_numpy(video.reshape(B * T, H, W, 3)).permute(0, 3, 1, 2)
    dist = model.encode(frames).latent_dist
    decoded = model.decode(torch.from_numpy(z.reshape(B * T, *z.shape[2:])).permute(0, 3, 1, 2)).sample

  def nhwc(x):  # [B*T, C, h, w] -> [B, T, h, w, C]
    x = x.permute(0, 2, 3, 1).numpy()
    return x.reshape(B, T, *x.shape[1:])

  return dict(sd=sd, video=video, z=z, mean=nhwc(dist.mean), logvar=nhwc(dist.logvar), decoded=nhwc(decoded))


def to_ldm(sd: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
  """diffusers AutoencoderKL keys -> LDM ``first_stage_model`` keys (prefix stripped).

  Written from the LDM module structure, independently of ``convert.vae_table``, so that the LDM path
  checks the table rather than repeating it.
  """
  renames = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.to_(q|k|v)\.", r".attn_1.\1."),
    (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out."),
  ]
  out = {}
  for key, w in sd.items():
    k = key
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", k)
    if m:  # diffusers numbers the up blocks in execution order; LDM's up.0 is the full-resolution level
      level = levels - 1 - int(m[1])
      k = f"decoder.up.{level}.block.{m[3]}.{m[4]}" if m[2] == "resnets" else f"decoder.up.{level}.upsample.{m[4]}"
    for pattern, repl in renames:
      k = re.sub(pattern, repl, k)
    if ".attn_1." in k and k.endswith("weight") and w.ndim == 2:
      w = w[:, :, None, None]  # Linear [C, C] -> Conv2d 1x1 [C, C, 1, 1]
    out[k] = w
  assert len(out) == len(sd)
  return out


def lazy(sd: dict[str, np.ndarray]) -> dict[str, common.SourceTensor]:
  return {k: common.SourceTensor(tuple(v.shape), lambda v=v: v) for k, v in sd.items()}


def sources_for(layout: str, sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return sd if layout == "diffusers" else to_ldm(sd, len(CFG.ch_mult))


@functools.partial(jax.jit, static_argnums=0)
def run(graphdef, state, video, latents, key):
  """Posterior, mean latents, sampled latents and decoded frames in one compile.

  The parameters are arguments (not closed-over constants), so both layouts share the compile.
  """
  model = nnx.merge(graphdef, state)
  return model.posterior(video), model.encode(video), model.encode(video, key), model.decode(latents)


@functools.partial(jax.jit, static_argnums=0)
def decode(graphdef, state, latents):
  return nnx.merge(graphdef, state).decode(latents)


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_parity_with_diffusers(reference, layout):
  sd = sources_for(layout, reference["sd"])
  assert vae_table.detect_layout(sd) == layout
  model = vae.from_params(CFG, vae_table.convert_vae(lazy(sd), CFG))
  key = jax.random.key(3)
  (mean, logvar), latents, sample, decoded = run(
    *nnx.split(model), reference["video"], reference["z"] * CFG.scale_factor, key
  )

  assert mean.shape == (B, T, H // 8, W // 8, CFG.embed_dim)
  assert rel_err(mean, reference["mean"]) <= TOL
  assert rel_err(logvar, reference["logvar"]) <= TOL
  assert rel_err(latents, CFG.scale_factor * reference["mean"]) <= TOL  # rng=None: the scaled mean
  assert decoded.shape == (B, T, H, W, CFG.out_channels) and decoded.dtype == jnp.float32
  assert rel_err(decoded, reference["decoded"]) <= TOL

  # rng given: posterior.sample() = mean + exp(logvar / 2) * N(0, 1), then scaled
  want = CFG.scale_factor * (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape))
  np.testing.assert_allclose(sample, want, rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(sample - latents))) > 1e-3


def test_legacy_diffusers_attention_names(reference):
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd = {}
  for k, v in reference["sd"].items():
    for new, old in legacy_names.items():
      k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    sd[k] = v
  assert vae_table.detect_layout(sd) == "diffusers_legacy"
  got = vae_table.convert_vae(lazy(sd), CFG)
  want = vae_table.convert_vae(lazy(reference["sd"]), CFG)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_decode_chunked_equals_one_shot(reference):
  # Parameters from the reference, not vae.build: eager random init costs seconds of op compiles on CPU.
  model = vae.from_params(CFG, vae_table.convert_vae(lazy(reference["sd"]), CFG))
  latents = np.random.default_rng(1).standard_normal((2, 3, 4, 6, CFG.embed_dim)).astype(np.float32)  # chunks 2, 1
  one_shot = decode(*nnx.split(model), latents)
  got = vae.decode_chunked(model, latents, 2)
  assert got.shape == one_shot.shape == (2, 3, 32, 48, CFG.out_channels)
  # The same per-frame computation; only XLA's conv blocking for another batch size may move the last
  # bits (measured 0 here; 1.7e-6 with 5 frames in chunks of 2).
  assert rel_err(got, one_shot) <= CHUNK_TOL
  assert float(jnp.max(jnp.abs(got))) > 0.1
  with pytest.raises(ValueError, match="chunk"):
    vae.decode_chunked(model, latents, 0)


def test_bfloat16_compute_stays_close(reference):
  params = vae_table.convert_vae(lazy(reference["sd"]), CFG)
  f32 = vae.from_params(CFG, params)
  bf16 = vae.from_params(dataclasses.replace(CFG, dtype="bfloat16"), params)  # the same float32 parameters
  latents = np.random.default_rng(2).standard_normal((1, 1, 4, 6, CFG.embed_dim)).astype(np.float32)
  want = decode(*nnx.split(f32), latents)
  got = decode(*nnx.split(bf16), latents)
  assert got.dtype == jnp.float32
  assert rel_err(got, want) <= 5e-2


def test_full_size_parameter_count():
  model = vae.abstract(VIDEOCRAFTER2.vae)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
  assert param_count(model) == 83_653_863
  targets = common.target_shapes(model)
  assert targets[("encoder", "down", 0, "block", 1, "norm1", "scale")][0] == (128,)
  assert targets[("decoder", "up", 0, "block", 0, "nin_shortcut", "kernel")][0] == (1, 1, 256, 128)
  assert targets[("decoder", "mid", "attn_1", "q", "kernel")][0] == (512, 512)


def manifest() -> dict[str, tuple[int, ...]]:
  return {k: tuple(v) for k, v in json.loads(MANIFEST.read_text())["tensors"].items()}


def test_manifest_maps_all_vae_keys():
  shapes = manifest()
  assert vae_table.check_manifest_vae(shapes) == 248
  assert len(vae_table.ldm_table(VIDEOCRAFTER2.vae)) == 248


def test_missing_key_is_named():
  shapes = manifest()
  del shapes["first_stage_model.decoder.up.1.upsample.conv.bias"]
  with pytest.raises(common.ConversionError, match=re.escape("decoder.up.1.upsample.conv.bias")):
    vae_table.check_manifest_vae(shapes)


@pytest.mark.parametrize(
  "key, shape",
  [
    ("encoder.mid.attn_1.q.weight", (512, 512, 3, 3)),  # conv1x1_as_linear alone would crop this
    ("encoder.mid.attn_1.proj_out.weight", (512, 512)),
    ("decoder.up.0.block.0.nin_shortcut.weight", (128, 512, 1, 1)),
  ],
)
def test_misshaped_key_is_named(key, shape):
  shapes = manifest()
  shapes[vae_table.LDM_PREFIX + key] = shape
  with pytest.raises(common.ConversionError, match=re.escape(key)):
    vae_table.check_manifest_vae(shapes)
