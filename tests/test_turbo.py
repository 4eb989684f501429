"""T2V-Turbo: the UNet's guidance embedding against diffusers, the consistency sampler against a float64
transcription and diffusers' LCMScheduler, v1's LoRA merge against the list applied as separate layers in
torch, the three converter layouts and their failures, and the clip-parallel turbo run (devices, resume)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import common, turbo, unet_table
from convert import videocrafter2 as conv
from convert.torch_io import torch_sources
from tests._checkpoints import original_state_dict
from tests._unet_reference import ReferenceUNet
from tests.test_parallel import tame
from tests.test_unet import _load, _original_layout, rel_err
from vinf_jax import checkpoint, pipeline, sampling
from vinf_jax.config import PRESETS, TINY
from vinf_jax.layers.embeddings import guidance_embedding
from vinf_jax.models import unet3d

RTOL = 1e-5  # float32
TINY_TURBO = PRESETS["tiny_turbo"]
_eps = jax.jit(lambda m, x, t, ctx, fps, w: m(x, t, ctx, fps, guidance=w))


def lcm_embedding(w: np.ndarray) -> np.ndarray:
  from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
  )

  return LatentConsistencyModelPipeline.get_guidance_scale_embedding(
    None, torch.from_numpy(w), embedding_dim=256
  ).numpy()


# ------------------------------------------------------------------------------------------------
# Model


def test_guidance_embedding_matches_diffusers_lcm():
  """The same function as the LCM pipeline's; both float32, so they agree to one float32 ulp of the largest
  argument 1000 w (sin and cos of arguments up to 12,000 rad carry that much rounding in any float32 code)."""
  w = np.array([0.0, 0.05, 1.0, 3.0, 7.5, 12.0], np.float32)
  ours, ref = np.asarray(guidance_embedding(jnp.asarray(w), 256)), lcm_embedding(w)
  ulp = np.spacing(np.float32(1000.0) * w)[:, None]
  assert ours.shape == ref.shape == (6, 256)
  assert np.all(np.abs(ours - ref) <= ulp), np.abs(ours - ref).max(1)


@pytest.fixture(scope="module")
def reference():
  return ReferenceUNet(TINY_TURBO.unet, seed=5)


def test_turbo_unet_matches_diffusers_time_cond_proj(reference):
  """diffusers' UNet3DConditionModel(time_cond_proj_dim=256) with timestep_cond (+ the fps hook) == ours."""
  cfg = TINY_TURBO.unet
  model = _load(cfg, lambda tg: unet_table.diffusers_table(tg, cfg), reference.state_dict_for_conversion())
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 16, 16, 4), dtype=np.float32)
  ctx = rng.standard_normal((2, 77, cfg.context_dim), dtype=np.float32)
  t, fps, w = np.array([999, 519]), np.array([16, 8]), np.array([7.5, 3.0], np.float32)
  want = reference(x, t, ctx, fps, timestep_cond=lcm_embedding(w))
  got = _eps(model, x, t, ctx, fps, w)
  assert rel_err(got, want) <= RTOL
  # and it is the guidance that changes the output
  assert rel_err(_eps(model, x, t, ctx, fps, w + 1.0), want) > 1e-3


def test_unet_conditioning_inputs_are_checked():
  plain = unet3d.abstract(TINY.unet)
  assert not hasattr(plain, "time_cond_proj") or plain.time_cond_proj is None
  x, ctx = jnp.zeros((1, 2, 8, 8, 4)), jnp.zeros((1, 77, 32))
  with pytest.raises(ValueError, match="guidance= is for T2V-Turbo"):
    jax.eval_shape(lambda m: m(x, 1, ctx, 8, guidance=7.5), plain)
  with pytest.raises(ValueError, match="pass guidance"):
    jax.eval_shape(lambda m: m(x, 1, ctx, 8), unet3d.abstract(TINY_TURBO.unet))
  with pytest.raises(ValueError, match="pass motion"):
    jax.eval_shape(lambda m: m(x, 1, ctx, 8, guidance=7.5), unet3d.abstract(PRESETS["tiny_turbo_v2"].unet))


# ------------------------------------------------------------------------------------------------
# Sampler


def turbo_reference(abar, ts, x, eps_fn, noises):
  """The consistency multistep sampler of the notes, transcribed in float64."""
  for i, t in enumerate(ts):
    a = abar[t]
    e = eps_fn(i, x)
    x0 = (x - np.sqrt(1 - a) * e) / np.sqrt(a)
    s = 10.0 * t
    c_skip, c_out = 0.25 / (s * s + 0.25), s / np.sqrt(s * s + 0.25)
    den = c_out * x0 + c_skip * x
    x = den if i == len(ts) - 1 else np.sqrt(abar[ts[i + 1]]) * den + np.sqrt(1 - abar[ts[i + 1]]) * noises[i]
  return x


@pytest.mark.parametrize("origin, steps, want", [(50, 4, [999, 759, 519, 279]), (200, 4, [999, 749, 499, 249])])
def test_turbo_timesteps(origin, steps, want):
  np.testing.assert_array_equal(sampling.turbo_timesteps(steps, origin), want)
  assert list(sampling.turbo_timesteps(8, 50)) == [999, 879, 759, 639, 519, 399, 279, 159]
  assert np.all(np.diff(sampling.turbo_timesteps(16, 200)) == -60)


@pytest.mark.parametrize("origin, steps", [(50, 4), (50, 8), (200, 16), (50, 1)])
def test_turbo_step_matches_float64_transcription(origin, steps):
  plan = sampling.make_plan(sampling.SamplerConfig(name="turbo", steps=steps, turbo_origin=origin, guidance=7.5))
  assert not plan.guided and plan.stochastic == (steps > 1) and sampling.num_steps(plan) == steps
  abar = sampling.schedule()["alphas_cumprod"].astype(np.float64)
  rng = np.random.default_rng(steps)
  x_t = rng.standard_normal((1, 3, 4, 4, 4))
  eps = [rng.standard_normal(x_t.shape) for _ in range(steps)]
  noises = [rng.standard_normal(x_t.shape) for _ in range(steps)]
  want = turbo_reference(abar, plan.timesteps, x_t, lambda i, x: eps[i], noises)
  state = sampling.init(plan, jnp.asarray(x_t, jnp.float32))
  for i in range(steps):
    state = sampling.step(plan, state, None, jnp.asarray(eps[i], jnp.float32), jnp.asarray(noises[i], jnp.float32))
  assert rel_err(state.x, want) <= RTOL
  np.testing.assert_allclose(np.asarray(state.x0), np.asarray(state.x), rtol=1e-6)  # the last step: x = denoised


def test_turbo_step_matches_diffusers_lcm_scheduler():
  from diffusers import LCMScheduler

  sched = LCMScheduler(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_scaling=10.0, prediction_type="epsilon"
  )
  ts = [999, 759, 519, 279]
  sched.set_timesteps(timesteps=ts)
  plan = sampling.make_plan(
    sampling.SamplerConfig(name="turbo", steps=4, turbo_origin=50), alphas_cumprod=sched.alphas_cumprod.numpy()
  )
  np.testing.assert_array_equal(plan.timesteps, ts)
  rng = np.random.default_rng(1)
  x = torch.from_numpy(rng.standard_normal((1, 4, 3, 4, 4)).astype(np.float32))
  state = sampling.init(plan, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)))
  gen = torch.Generator().manual_seed(0)
  for i, t in enumerate(ts):
    e = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))  # what step() draws below
    gen.manual_seed(100 + i)
    x = sched.step(e, t, x, generator=gen).prev_sample
    to = lambda a: jnp.asarray(a.numpy().transpose(0, 2, 3, 4, 1))
    state = sampling.step(plan, state, None, to(e), to(noise))
    assert rel_err(state.x, x.numpy().transpose(0, 2, 3, 4, 1)) <= RTOL, i


def test_motion_scale_and_cutoff():
  plan = sampling.make_plan(sampling.SamplerConfig(name="turbo", steps=4, turbo_origin=200, motion_scale=0.05))
  np.testing.assert_allclose(plan.motion, [0.05, 0.05, 0.0, 0.0])  # t = 999, 749 >= 500; 499, 249 below
  np.testing.assert_array_equal(sampling.make_plan(sampling.SamplerConfig()).motion, 0.0)
  with pytest.raises(ValueError, match="turbo_origin=100"):
    sampling.SamplerConfig(name="turbo", turbo_origin=100).validate()
  with pytest.raises(ValueError, match=r"steps=51, expected an integer in 1\.\.50"):
    sampling.SamplerConfig(name="turbo", steps=51).validate()


# ------------------------------------------------------------------------------------------------
# LoRA (v1): merged weights against the list applied as separate layers


def _lora_hooks(module: torch.nn.Module, name_of: dict[str, str], pairs: dict[str, tuple]):
  handles = []
  for orig, (up, down) in pairs.items():
    mod = module.get_submodule(name_of[orig])

    def hook(m, inp, out, up=up, down=down):
      x = inp[0]
      if isinstance(m, torch.nn.Linear):
        return out + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
      f = torch.nn.functional.conv2d if isinstance(m, torch.nn.Conv2d) else torch.nn.functional.conv3d
      return out + f(f(x, down, stride=m.stride, padding=m.padding), up)

    handles.append(mod.register_forward_hook(hook))
  return handles


def test_lora_list_merge_matches_separate_layers(reference):
  cfg = TINY_TURBO.unet
  diff_sd = reference.state_dict_for_conversion()
  original = _original_layout(diff_sd, cfg)
  base = {k: v for k, v in original.items() if k != turbo.TIME_COND}  # model.ckpt: VideoCrafter2, no time_cond_proj
  keys = turbo.lora_keys({k: tuple(v.shape) for k, v in original.items()})
  g = torch.Generator().manual_seed(3)
  lora, pairs = [], {}
  for k in keys:
    up_s, down_s = turbo.lora_pair_shapes(tuple(original[k].shape))
    up, down = 0.1 * torch.randn(up_s, generator=g), 0.1 * torch.randn(down_s, generator=g)
    lora += [up, down]
    pairs[k] = (up, down)
  merged, info = turbo.merge_lora(
    torch_sources(base),
    list(torch_sources({str(i): t for i, t in enumerate(lora)}).values()),
    model_channels=cfg.model_channels,
  )
  assert info.pairs == len(keys) and keys[4] == turbo.TIME_COND
  targets = common.target_shapes(unet3d.abstract(cfg))
  params = common.convert(unet_table.original_table(targets), targets, merged, np.float32, "unet")
  graphdef, state = nnx.split(unet3d.abstract(cfg))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  ours = nnx.merge(graphdef, state)

  # torch: VideoCrafter2's weights, the fixed time_cond_proj base, and the list as separate layers
  ref = ReferenceUNet(cfg, seed=5)
  with torch.no_grad():
    ref.unet.time_embedding.cond_proj.weight.copy_(torch.from_numpy(turbo.time_cond_base(cfg.model_channels)))
  name_of = {k: unet_table.diffusers_key(k, cfg).removesuffix(".weight") for k in keys}
  handles = _lora_hooks(ref.unet, name_of, pairs)
  try:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 16, 16, 4), dtype=np.float32)
    ctx = rng.standard_normal((2, 77, cfg.context_dim), dtype=np.float32)
    t, fps, w = np.array([759, 279]), np.array([16, 16]), np.array([7.5, 7.5], np.float32)
    want = ref(x, t, ctx, fps, timestep_cond=lcm_embedding(w))
  finally:
    for h in handles:
      h.remove()
  assert rel_err(_eps(ours, x, t, ctx, fps, w), want) <= RTOL


def test_lora_order_of_the_full_size_model():
  """The list order for VideoCrafter2's UNet is its state dict's (the published manifest), 575 pairs."""
  manifest = json.loads(open(conv_manifest()).read())["tensors"]
  unet = {k[len(conv.UNET_PREFIX) :]: v for k, v in manifest.items() if k.startswith(conv.UNET_PREFIX)}
  in_file = [k for k in unet if k.endswith(".weight") and len(unet[k]) in (2, 4, 5)]
  assert turbo.lora_keys(unet) == in_file
  with_time = turbo.lora_keys({**unet, turbo.TIME_COND: [320, 256]})
  assert len(with_time) == 575 and with_time[4] == turbo.TIME_COND and with_time[3] == "fps_embedding.2.weight"
  assert turbo.lora_pair_shapes((320, 4, 3, 3)) == ((320, 4, 1, 1), (4, 4, 3, 3))  # input_blocks.0.0: rank 4
  assert turbo.lora_pair_shapes((320, 320, 3, 1, 1)) == ((320, 64, 1, 1, 1), (64, 320, 3, 1, 1))


def conv_manifest():
  from convert.manifests import MANIFESTS

  return MANIFESTS / "videocrafter2_state_dict.json"


# ------------------------------------------------------------------------------------------------
# Converter layouts


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("turbo_ckpt")
  sd = original_state_dict(TINY, seed=1)
  torch.save({"state_dict": sd}, d / "model.ckpt")
  merged = dict(sd)
  merged["model.diffusion_model." + turbo.TIME_COND] = torch.randn(32, 256) / 16
  torch.save({"state_dict": merged}, d / "t2v_turbo_vc2.pt")
  unet = {k[len(conv.UNET_PREFIX) :]: v for k, v in merged.items() if k.startswith(conv.UNET_PREFIX)}
  v2 = dict(
    unet, **{"motion_cond_proj.weight": torch.randn(32, 256) / 16, "combine_proj.weight": torch.randn(32, 64) / 8}
  )
  torch.save(v2, d / "unet_mg.pt")
  shapes = {k: tuple(v.shape) for k, v in unet.items()}
  keys = turbo.lora_keys(shapes)
  lora = [t for k in keys for t in (torch.randn(s) * 0.01 for s in turbo.lora_pair_shapes(shapes[k]))]
  torch.save(lora, d / "unet_lora.pt")
  torch.save(lora[:-2], d / "short_lora.pt")
  torch.save([lora[1], lora[0], *lora[2:]], d / "swapped_lora.pt")
  return d


def _convert(out, **kw):
  conv.run(out=str(out), cfg=TINY, dtype="float32", **kw)
  return checkpoint.read_model_dir(out)[0], json.loads((out / "config.json").read_text())


def test_converter_turbo_layouts(base_ckpt, tmp_path):
  cfg, meta = _convert(tmp_path / "merged", ckpt=str(base_ckpt / "t2v_turbo_vc2.pt"))
  assert (
    cfg.name == "tiny_turbo"
    and cfg.unet.time_cond_proj_dim == 256
    and meta["turbo"]["layout"] == "v1 merged checkpoint"
  )
  cfg, meta = _convert(
    tmp_path / "lora", ckpt=str(base_ckpt / "model.ckpt"), turbo_lora=str(base_ckpt / "unet_lora.pt")
  )
  assert cfg.name == "tiny_turbo" and meta["turbo"]["time_cond_proj_base"]["seed"] == turbo.TIME_COND_BASE_SEED
  cfg, meta = _convert(tmp_path / "v2", ckpt=str(base_ckpt / "model.ckpt"), turbo_unet=str(base_ckpt / "unet_mg.pt"))
  assert cfg.name == "tiny_turbo_v2" and cfg.unet.motion_cond and meta["turbo"]["layout"] == "v2 UNet state dict"
  plain, meta = _convert(tmp_path / "plain", ckpt=str(base_ckpt / "model.ckpt"))
  assert plain.name == "tiny" and "turbo" not in meta


@pytest.mark.parametrize(
  "kw, match",
  [
    ({"turbo_lora": "short_lora.pt"}, r"the LoRA list has \d+ tensors; this UNet takes \d+"),
    ({"turbo_lora": "swapped_lora.pt"}, r"pair 0 \(list indices 0, 1\) for time_embed\.0\.weight"),
    ({"turbo_lora": "unet_lora.pt", "ckpt": "t2v_turbo_vc2.pt"}, "already has time_cond_proj"),
    ({"turbo_lora": "unet_lora.pt", "turbo_unet": "unet_mg.pt"}, "at most one of --turbo_lora"),
  ],
)
def test_converter_turbo_failures_leave_nothing(base_ckpt, tmp_path, kw, match):
  kw = {k: str(base_ckpt / v) for k, v in kw.items()}
  kw.setdefault("ckpt", str(base_ckpt / "model.ckpt"))
  with pytest.raises((ValueError, common.ConversionError), match=match):
    conv.run(out=str(tmp_path / "out"), cfg=TINY, dtype="float32", **kw)
  assert os.listdir(tmp_path) == []


def test_partial_turbo_unet_is_refused():
  src = {
    "time_cond_proj.weight": common.SourceTensor((320, 256), lambda: None),
    "combine_proj.weight": common.SourceTensor((320, 640), lambda: None),
  }
  with pytest.raises(common.ConversionError, match=r"partial T2V-Turbo UNet.*missing \['motion_cond_proj.weight'\]"):
    turbo.detect(PRESETS["videocrafter2"], src)
  with pytest.raises(common.ConversionError, match=r"wrong shape: time_cond_proj.weight \(320, 128\)"):
    turbo.detect(PRESETS["videocrafter2"], {"time_cond_proj.weight": common.SourceTensor((320, 128), lambda: None)})


def test_check_manifest_of_the_merged_turbo_layout(tmp_path, capsys):
  m = json.loads(open(conv_manifest()).read())
  m["tensors"]["model.diffusion_model." + turbo.TIME_COND] = [320, 256]
  (tmp_path / "turbo.json").write_text(json.dumps(m))
  assert conv.check_manifest(str(tmp_path / "turbo.json")) == 2040
  assert "videocrafter2_turbo" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# The clip-parallel run

BASE = pipeline.GenerationConfig(
  prompts=("a red panda eating bamboo",),
  model="tiny_turbo",
  frames=16,
  height=64,
  width=64,
  sampler="turbo",
  steps=3,
  window=2,
  num_global=4,
  global_phase_steps=1,
  num_devices=4,
  decode_chunk=4,
)


@pytest.fixture(scope="module")
def models():
  m = pipeline.load_models(BASE)
  m.unet = tame(m.unet)
  return m


def quiet(msg):
  del msg


def test_turbo_latents_same_on_one_and_four_devices(models):
  runs = {d: pipeline.generate(dataclasses.replace(BASE, num_devices=d), models=models, log=quiet) for d in (1, 4)}
  a, b = runs[1].latents, runs[4].latents
  assert a.shape == (1, 16, 8, 8, 4) and np.isfinite(a).all() and a.std() > 0.1
  assert rel_err(b, a) <= RTOL
  side = runs[4].sidecar["settings"]
  assert side["guidance"] == 7.5 and side["sampler"] == "turbo" and side["global_phase_from"] == 999.0


def test_turbo_resume_equals_uninterrupted(models, tmp_path):
  full = pipeline.generate(BASE, models=models, log=quiet)
  state = tmp_path / "state"
  part = pipeline.generate(dataclasses.replace(BASE, state_dir=str(state), stop_after=2), models=models, log=quiet)
  assert part.latents is None and part.steps_done == 2
  rest = pipeline.generate(dataclasses.replace(BASE, resume=str(state)), models=models, log=quiet)
  np.testing.assert_array_equal(rest.latents, full.latents)


def test_turbo_settings_are_validated():
  with pytest.raises(ValueError, match="sampler='turbo' needs T2V-Turbo weights"):
    pipeline.validate(dataclasses.replace(BASE, model="tiny"))
  with pytest.raises(ValueError, match="is a T2V-Turbo model .* use sampler='turbo'"):
    pipeline.validate(dataclasses.replace(BASE, sampler="dpmpp_sde"))
  with pytest.raises(ValueError, match="global_phase_steps=4 is more than the 3 sampling steps"):
    pipeline.validate(dataclasses.replace(BASE, global_phase_steps=4))
  t = dataclasses.replace(BASE, global_phase_steps=2).temporal_config()
  assert t.global_phase_from == t.local_phase_below == 679.0  # the second of 999, 679, 359 (3 steps of 50)
  assert dataclasses.replace(BASE, guidance=None).resolved_guidance() == 7.5
  assert pipeline.GenerationConfig().resolved_guidance() == 12.0


def test_plain_unet_unchanged_and_v2_combination():
  """A zero time_cond_proj leaves VideoCrafter2's UNet bit for bit (emb + 0 == emb), and v2's combine_proj = [I | 0]
  gives v1 whatever the motion embedding: the motion term enters only through combine_proj's second half."""
  plain = pipeline.random_model(unet3d.UNet3D, TINY.unet, 4)
  pure = nnx.to_pure_dict(nnx.state(plain))
  c = TINY.unet.model_channels

  def variant(name, extra):
    graphdef, state = nnx.split(unet3d.abstract(PRESETS[name].unet))
    nnx.replace_by_pure_dict(state, {**pure, **extra})
    return nnx.merge(graphdef, state)

  w1 = jnp.asarray(np.random.default_rng(0).standard_normal((256, c)) / 16, jnp.float32)
  v1_zero = variant("tiny_turbo", {"time_cond_proj": {"kernel": jnp.zeros((256, c))}})
  v1 = variant("tiny_turbo", {"time_cond_proj": {"kernel": w1}})
  eye = jnp.concatenate([jnp.eye(c), jnp.zeros((c, c))], axis=0)  # [2C, C]: keeps the guidance half
  v2 = variant(
    "tiny_turbo_v2",
    {
      "time_cond_proj": {"kernel": w1},
      "motion_cond_proj": {"kernel": jnp.ones((256, c))},
      "combine_proj": {"kernel": eye},
    },
  )
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 2, 8, 8, 4)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)
  t, fps = jnp.asarray([999, 279]), jnp.asarray([16, 16])
  run = jax.jit(lambda m, **kw: m(x, t, ctx, fps, **kw))
  want = np.asarray(run(plain))
  np.testing.assert_array_equal(np.asarray(run(v1_zero, guidance=7.5)), want)
  got_v1 = np.asarray(run(v1, guidance=7.5))
  assert rel_err(got_v1, want) > 1e-4  # the guidance embedding matters once its projection is non-zero
  for m in (0.0, 0.05):
    assert rel_err(run(v2, guidance=7.5, motion=m), got_v1) <= RTOL
