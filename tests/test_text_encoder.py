"""Text encoder: parity with transformers' CLIPTextModel through both key layouts, tables, strictness."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import common, text_table
from convert.manifests import MANIFESTS
from tests import _reference
from vinf_jax.config import TINY, VIDEOCRAFTER2, TextConfig
from vinf_jax.models import param_count, text_encoder

MANIFEST = MANIFESTS / "videocrafter2_state_dict.json"

CFG = TINY.text  # width 32, 4 heads, 3 stored layers, 2 run
RTOL = 1e-5  # max|a - b| / max|b|, float32


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def sources_of(state: dict[str, torch.Tensor]) -> dict[str, common.SourceTensor]:
  return {
    k: common.SourceTensor(tuple(v.shape), (lambda v=v: v.detach().numpy().astype(np.float32)))
    for k, v in state.items()
  }


@pytest.fixture(scope="module")
def hf_model():
  """CLIPTextModel with ``layers_used`` layers and non-zero random weights everywhere."""
  from transformers import CLIPTextConfig, CLIPTextModel

  hf_cfg = CLIPTextConfig(
    vocab_size=CFG.vocab_size,
    hidden_size=CFG.width,
    intermediate_size=CFG.width * CFG.mlp_ratio,
    num_hidden_layers=CFG.layers_used,
    num_attention_heads=CFG.heads,
    max_position_embeddings=CFG.context_length,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    attn_implementation="eager",
  )
  torch.manual_seed(0)
  model = CLIPTextModel(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif "embedding" in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
  assert all((p != 0).all() for p in model.parameters())
  return model


def hf_state(model) -> dict[str, torch.Tensor]:
  """The model's tensors under transformers 5 names (``text_model.`` stripped when transformers 4 adds it)."""
  sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
  sd.pop("embeddings.position_ids", None)
  return sd


@pytest.fixture(scope="module")
def open_clip_state(hf_model) -> dict[str, torch.Tensor]:
  """The same weights in VideoCrafter2's layout (``cond_stage_model.model.`` stripped): q|k|v packed into
  in_proj, renamed, plus a stored-but-unused last block, ``text_projection`` and ``logit_scale``."""
  hf = hf_state(hf_model)
  torch.manual_seed(1)
  out = {
    "token_embedding.weight": hf["embeddings.token_embedding.weight"],
    "positional_embedding": hf["embeddings.position_embedding.weight"],
    "ln_final.weight": hf["final_layer_norm.weight"],
    "ln_final.bias": hf["final_layer_norm.bias"],
    "text_projection": torch.randn(CFG.width, CFG.width),
    "logit_scale": torch.tensor(math.log(1 / 0.07)),
  }
  for i in range(CFG.layers):
    o = f"transformer.resblocks.{i}."
    src = f"encoder.layers.{min(i, CFG.layers_used - 1)}."
    h = {k[len(src) :]: v for k, v in hf.items() if k.startswith(src)}
    if i >= CFG.layers_used:  # the unused last block: random
      h = {k: torch.randn_like(v) for k, v in h.items()}
    for leaf in ("weight", "bias"):
      out[o + f"attn.in_proj_{leaf}"] = torch.cat([h[f"self_attn.{x}_proj.{leaf}"] for x in "qkv"], 0)
      for mine, theirs in (
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("attn.out_proj", "self_attn.out_proj"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
      ):
        out[o + f"{mine}.{leaf}"] = h[f"{theirs}.{leaf}"]
  return out


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
  """Prompts of several lengths: SOT, random ids, EOT, then 0-padding (and one full row)."""
  rng = np.random.default_rng(0)
  rows = []
  for n in (0, 5, 30, 75):
    rows.append([49406, *rng.integers(1, 49406, n), 49407] + [0] * (75 - n))
  return np.asarray(rows, np.int32)


@pytest.fixture(scope="module")
def hf_out(hf_model, tokens) -> np.ndarray:
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(tokens).long()).last_hidden_state.numpy()


def test_parity_through_transformers_keys(hf_model, tokens, hf_out):
  sd = hf_state(hf_model)
  cfg = text_table.config_for_sources(CFG, sd)
  assert (cfg.layers, cfg.layers_used) == (CFG.layers_used, CFG.layers_used)  # the HF layout stores only these
  params = text_table.convert_text(sources_of(sd), cfg)
  out = text_encoder.from_params(cfg, params)(jnp.asarray(tokens))
  assert out.shape == (4, 77, CFG.width) and out.dtype == jnp.float32
  err = rel_err(out, hf_out)
  print(f"transformers keys: rel err {err:.2e}")
  assert err <= RTOL


def test_transformers_4_prefix_and_position_ids_buffer(hf_model):
  sd = hf_state(hf_model)
  old = {"text_model." + k: v for k, v in sd.items()} | {"text_model.embeddings.position_ids": torch.arange(77)[None]}
  cfg = text_table.config_for_sources(CFG, old)
  a = text_table.convert_text(sources_of(sd), cfg)
  b = text_table.convert_text(sources_of(old), cfg)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_parity_through_open_clip_keys(open_clip_state, tokens, hf_out):
  params = text_table.convert_text(sources_of(open_clip_state), CFG)
  assert text_table.detect_layout(open_clip_state) == "open_clip"
  model = text_encoder.from_params(CFG, params)
  assert len(model.resblocks) == CFG.layers  # the unused block is converted too
  out = model(jnp.asarray(tokens))
  err = rel_err(out, hf_out)
  print(f"open_clip keys vs transformers: rel err {err:.2e}")
  assert err <= RTOL

  # The same weights in open_clip's own modules (nn.MultiheadAttention's packed q|k|v), loaded strictly.
  ref = _reference.open_clip_text_tower(CFG.width, CFG.heads, CFG.layers, CFG.vocab_size).eval()
  ref.load_state_dict(open_clip_state, strict=True)
  with torch.no_grad():
    want = ref.encode(torch.from_numpy(tokens).long()).numpy()
  assert rel_err(want, hf_out) <= RTOL  # the test's own layout conversion is right
  err = rel_err(out, want)
  print(f"open_clip keys vs open_clip modules: rel err {err:.2e}")
  assert err <= RTOL


def test_causal_and_no_padding_mask():
  model = text_encoder.build(CFG, seed=3)
  a = np.asarray([[49406, 320, 1125, 49407] + [0] * 73], np.int32)
  b = a.copy()
  b[0, 4:] = 7  # different "padding": positions 0..3 must not change, later ones must
  ya, yb = np.asarray(model(jnp.asarray(a))), np.asarray(model(jnp.asarray(b)))
  np.testing.assert_array_equal(ya[:, :4], yb[:, :4])
  assert np.abs(ya[:, 4:] - yb[:, 4:]).min() > 0


def test_bfloat16_runs():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  f32 = text_encoder.build(CFG, seed=0)
  bf16 = text_encoder.from_params(cfg, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(f32))))
  t = jnp.asarray([[49406, 320, 49407] + [0] * 74], jnp.int32)
  y, y16 = f32(t), bf16(t)
  assert y16.dtype == jnp.float32 and rel_err(y16, y) < 0.05


def manifest() -> dict[str, tuple]:
  return {k: tuple(v) for k, v in json.loads(MANIFEST.read_text())["tensors"].items()}


def test_full_size_parameter_count():
  model = text_encoder.abstract(VIDEOCRAFTER2.text)  # nothing allocated
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
  w = VIDEOCRAFTER2.text.width
  unused = w * w + 1  # text_projection [1024, 1024] and logit_scale []: stored, dropped by the converter
  assert param_count(model) + unused == 354_032_641
  stage = {k: s for k, s in manifest().items() if k.startswith("cond_stage_model.")}
  assert sum(math.prod(s) for s in stage.values()) == 354_032_641
  assert stage["cond_stage_model.model.text_projection"] == (w, w) and stage["cond_stage_model.model.logit_scale"] == ()


def test_full_size_manifest_maps():
  m = manifest()
  assert sum(k.startswith("cond_stage_model.") for k in m) == 294
  assert text_table.check_manifest_text(m) == 294


def test_manifest_strictness():
  m = manifest()
  with pytest.raises(common.ConversionError, match=r"cond_stage_model\.extra"):
    text_table.check_manifest_text(m | {"cond_stage_model.extra": (3,)})
  bad = dict(m)
  bad["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] = (3072, 1000)
  with pytest.raises(common.ConversionError, match=r"resblocks\.23\.attn\.in_proj_weight#q"):
    text_table.check_manifest_text(bad)
  bad = dict(m)
  del bad["cond_stage_model.model.logit_scale"]
  with pytest.raises(common.ConversionError, match="logit_scale: missing"):
    text_table.check_manifest_text(bad)


@pytest.mark.parametrize("layout", ["open_clip", "hf"])
def test_missing_and_misshaped_keys_are_named(layout, hf_model, open_clip_state):
  state = dict(open_clip_state) if layout == "open_clip" else hf_state(hf_model)
  cfg = CFG if layout == "open_clip" else text_table.config_for_sources(CFG, state)
  drop = "transformer.resblocks.1.mlp.c_fc.bias" if layout == "open_clip" else "encoder.layers.1.mlp.fc1.bias"
  with pytest.raises(common.ConversionError, match=r"missing source keys:\s+" + drop.replace(".", r"\.")):
    text_table.convert_text(sources_of({k: v for k, v in state.items() if k != drop}), cfg)
  key = "ln_final.weight" if layout == "open_clip" else "final_layer_norm.weight"
  with pytest.raises(common.ConversionError, match=r"mis-shaped tensors:\s+" + key.replace(".", r"\.") + r" \(31,\)"):
    text_table.convert_text(sources_of(state | {key: torch.ones(31)}), cfg)
  with pytest.raises(common.ConversionError, match=r"unexpected source keys:\s+surplus\.weight"):
    text_table.convert_text(sources_of(state | {"surplus.weight": torch.ones(3)}), cfg)


def test_open_clip_specific_checks(open_clip_state):
  key = "transformer.resblocks.0.attn.in_proj_bias"
  with pytest.raises(common.ConversionError, match=key.replace(".", r"\.") + r": shape \(95,\)"):
    text_table.convert_text(sources_of(open_clip_state | {key: torch.ones(95)}), CFG)
  with pytest.raises(common.ConversionError, match="text_projection: missing"):
    text_table.convert_text(sources_of({k: v for k, v in open_clip_state.items() if k != "text_projection"}), CFG)
  # a checkpoint holding fewer blocks than the config stores
  with pytest.raises(common.ConversionError, match=r"transformer\.resblocks\.2\.attn\.out_proj\.weight"):
    text_table.convert_text(
      sources_of({k: v for k, v in open_clip_state.items() if not k.startswith("transformer.resblocks.2.")}), CFG
    )


def test_hf_with_too_few_layers():
  with pytest.raises(common.ConversionError, match="1 layers found"):
    text_table.config_for_sources(CFG, ["encoder.layers.0.mlp.fc1.bias", "final_layer_norm.bias"])


def test_table_covers_every_parameter_once():
  targets = common.target_shapes(text_encoder.abstract(VIDEOCRAFTER2.text))
  assert text_table.targets_of(VIDEOCRAFTER2.text) == targets
  for layout in text_table.LAYOUTS:
    tab = text_table.table(VIDEOCRAFTER2.text, layout)
    assert set(tab) == set(targets)
    assert len({r.source for r in tab.values()}) == len(tab)


def test_from_params_and_config_validation_name_the_problem():
  good = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(text_encoder.build(CFG))))
  good["ln_final"]["scale"] = np.ones(31, np.float32)
  with pytest.raises(ValueError, match=r"ln_final/scale: shape \(31,\), expected \(32,\)"):
    text_encoder.from_params(CFG, good)
  with pytest.raises(ValueError, match=r"width=30 not divisible by heads=4\n  - layers_used=4, expected 1 <="):
    TextConfig(width=30, heads=4, layers=3, layers_used=4).validate()
