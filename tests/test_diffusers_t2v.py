"""Issue 26: diffusers text-to-video pipeline folders (the ModelScope family) converted and run.

Small random pipelines are built with diffusers and transformers themselves (UNet3DConditionModel without fps,
AutoencoderKL, CLIPTextModel, a CLIPTokenizer over vocabulary files this test writes, DDIMScheduler /
DPMSolverMultistepScheduler), saved with ``save_pretrained``, converted with ``convert.diffusers_t2v`` and
compared at float32 (relative error <= 1e-5): the UNet, the VAE decode, the text embedding, the tokenizer ids, a
whole ``TextToVideoSDPipeline`` run (same x_T and per-step noise injected, ``output_type="latent"``) against our
``generate`` on one device with full attention; then dual-scope attention on 1 vs 4 fake devices. The whole runs
go unguided (1e-5) and at guidance 9 (1e-5 times the guidance's error amplification, see ``guided_rtol``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import (
  AutoencoderKL,
  DDIMScheduler,
  DPMSolverMultistepScheduler,
  TextToVideoSDPipeline,
  UNet3DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from convert import diffusers_t2v
from convert.common import ConversionError
from tests import _reference
from tests._unet_reference import randomize_
from vinf_jax import checkpoint, pipeline, sampling
from vinf_jax import schedule as schedule_lib
from vinf_jax import tokenizer as tk
from vinf_jax.config import TINY
from vinf_jax.models import text_encoder, unet3d, vae

RTOL = 1e-5  # float32, relative to the largest magnitude of the reference
FRAMES, HEIGHT, WIDTH = 16, 64, 64
PROMPT = "a red panda eating bamboo in the snow"
# The ModelScope family's DDIM config (zeroscope_v2_576w / text-to-video-ms-1.7b: no timestep_spacing key).
ZEROSCOPE_DDIM = dict(
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  clip_sample=False,
  set_alpha_to_one=False,
  steps_offset=1,
)


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def guided_rtol(guidance: float) -> float:
  """RTOL for a whole run with classifier-free guidance: eps = u + g (c - u) = g c - (g - 1) u, so rounding errors
  d in each branch's eps reach the guided eps as up to g d + (g - 1) d = (2g - 1) d. Measured (float32, this
  module's tiny pipeline, same runs at g = 1 and g = 9): 4 dpmpp_sde steps vs TextToVideoSDPipeline 7.1e-7 ->
  1.0e-5 (14x), 3 dual-scope steps on 4 devices vs 1 6.8e-7 -> 1.2e-5 (18x); the bound is 17x at g = 9. The
  unguided runs (g = 1) hold the whole chain to RTOL itself."""
  return RTOL * max(1.0, 2.0 * guidance - 1.0)


def _components(seed: int = 0) -> dict:
  u, v = TINY.unet, TINY.vae
  unet = UNet3DConditionModel(
    block_out_channels=tuple(u.model_channels * m for m in u.channel_mult),
    layers_per_block=u.num_res_blocks,
    cross_attention_dim=u.context_dim,
    attention_head_dim=u.num_head_channels,
    norm_num_groups=u.num_groups,
  )
  chans = tuple(v.ch * m for m in v.ch_mult)
  autoencoder = AutoencoderKL(
    block_out_channels=chans,
    down_block_types=("DownEncoderBlock2D",) * len(chans),
    up_block_types=("UpDecoderBlock2D",) * len(chans),
    layers_per_block=v.num_res_blocks,
    latent_channels=4,
    norm_num_groups=v.num_groups,
    scaling_factor=0.18215,
  )
  text = CLIPTextModel(
    CLIPTextConfig(
      vocab_size=49408,
      hidden_size=32,
      intermediate_size=128,
      num_hidden_layers=3,  # any count: the pipeline runs them all (last_hidden_state)
      num_attention_heads=4,
      max_position_embeddings=77,
      hidden_act="gelu",
      layer_norm_eps=1e-5,
    )
  )
  for i, m in enumerate((unet, autoencoder, text)):
    randomize_(m, seed + i)
    m.eval()
  return {"unet": unet, "vae": autoencoder, "text_encoder": text}


def _tokenizer(tmp, pad_token: str = "!") -> CLIPTokenizer:
  vocab = tmp / "vocab_files"
  tk.write_vocab_files(_reference.open_clip_bpe_path(), str(vocab))
  return CLIPTokenizer.from_pretrained(str(vocab), pad_token=pad_token, model_max_length=77)


def _save_pipeline(folder, parts, tok, scheduler, *, vocab_files: bool = True, **save_kw) -> TextToVideoSDPipeline:
  pipe = TextToVideoSDPipeline(tokenizer=tok, scheduler=scheduler, **parts)
  pipe.save_pretrained(str(folder), **save_kw)
  if vocab_files:  # as the published folders (transformers 5 itself writes only tokenizer.json)
    for name in ("vocab.json", "merges.txt"):
      shutil.copy(os.path.join(tok.name_or_path, name), folder / "tokenizer" / name)  # _tokenizer's files
  return pipe


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The pipeline (DDIM, as the ModelScope family ships it), its folder and its conversion."""
  tmp = tmp_path_factory.mktemp("t2v")
  parts = _components()
  pipe = _save_pipeline(tmp / "pipe", parts, _tokenizer(tmp), DDIMScheduler(**ZEROSCOPE_DDIM))
  out = tmp / "converted"
  diffusers_t2v.run(out=str(out), folder=str(tmp / "pipe"))
  return {"tmp": tmp, "pipe": pipe, "parts": parts, "out": out}


def test_config_records_what_the_pipeline_is(built):
  cfg, components = checkpoint.read_model_dir(built["out"])
  assert components == ["unet", "vae", "text_encoder", "tokenizer"]
  assert cfg.name == "diffusers_t2v" and "TextToVideoSDPipeline" in cfg.kind
  assert not cfg.unet.fps_cond and cfg.unet.attention_levels == (0, 1, 2)
  assert (cfg.text.layers, cfg.text.layers_used, cfg.text.pad_id, cfg.text.pad_text) == (3, 3, 0, "!")
  assert cfg.schedule == schedule_lib.Schedule(kind="diffusers", timestep_spacing="leading")
  meta = json.loads((built["out"] / "config.json").read_text())
  assert meta["pipeline"]["classes"]["scheduler"] == "DDIMScheduler"


def test_unet_parity(built):
  cfg, _ = checkpoint.read_model_dir(built["out"])
  ours = checkpoint.load_params(built["out"] / "unet", make_abstract=lambda: unet3d.abstract(cfg.unet))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 8, 4)).astype(np.float32)  # [B, T, h, w, c]
  ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
  t = np.array([981, 17], np.int64)
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    want = built["parts"]["unet"](xt, torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
  want = want.numpy().transpose(0, 2, 3, 4, 1)
  got = np.asarray(jax.jit(lambda m, *a: m(*a))(ours, x, t.astype(np.int32), ctx))
  err = rel_err(got, want)
  print(f"UNet (no fps) vs diffusers: rel err {err:.2e}")
  assert err <= RTOL, err


def test_vae_decode_parity(built):
  cfg, _ = checkpoint.read_model_dir(built["out"])
  ours = checkpoint.load_params(built["out"] / "vae", make_abstract=lambda: vae.abstract(cfg.vae))
  z = np.random.default_rng(1).standard_normal((1, 2, 8, 8, 4)).astype(np.float32)  # as the UNet sees them
  with torch.no_grad():
    zt = torch.from_numpy(z[0].transpose(0, 3, 1, 2).copy()) / 0.18215
    want = built["parts"]["vae"].decode(zt).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(lambda m, z: m.decode(z))(ours, z))[0]
  err = rel_err(got, want)
  print(f"VAE decode vs diffusers: rel err {err:.2e}")
  assert err <= RTOL, err


# "!" is the pad token of SD2-style tokenizers, an added token that transformers reads anywhere (id 0 here too)
PROMPTS = [PROMPT, "", "A koi pond, autumn leaves; 4K!", "x " * 100, "don't stop: it's 3 o'clock!!", "wow!?"]


def test_tokenizer_ids_and_text_embedding(built):
  cfg, _ = checkpoint.read_model_dir(built["out"])
  tok = tk.load_tokenizer(str(built["out"] / "tokenizer"), cfg.text.context_length, cfg.text.pad_id, cfg.text.pad_text)
  pipe_tok = CLIPTokenizer.from_pretrained(str(built["tmp"] / "pipe" / "tokenizer"))
  want_ids = pipe_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
  np.testing.assert_array_equal(tok(PROMPTS), want_ids)
  enc = checkpoint.load_params(
    built["out"] / "text_encoder", make_abstract=lambda: text_encoder.abstract(cfg.text), sharding=None
  )
  got = pipeline.encode_prompts(enc, tok, PROMPTS)
  with torch.no_grad():
    want = built["pipe"].encode_prompt(PROMPTS, "cpu", 1, False)[0].numpy()
  err = rel_err(got, want)
  print(f"tokenizer ids: identical on {len(PROMPTS)} prompts; text embedding vs the pipeline: rel err {err:.2e}")
  assert err <= RTOL, err


def test_pad_token_of_the_tokenizer_is_kept(tmp_path):
  """A tokenizer padding with <|endoftext|> (49407) instead of '!' (0) gives the same ids here."""
  tok = _tokenizer(tmp_path, pad_token="<|endoftext|>")
  folder = tmp_path / "pipe"
  tok.save_pretrained(str(folder / "tokenizer"))  # tokenizer.json only: the vocabulary is read from it
  files = diffusers_t2v.tokenizer_files_dir(str(folder), str(tmp_path / "staging"))
  pad = diffusers_t2v.tokenizer_pad(str(folder), files, 77)
  assert pad == (tk.END_ID, "")
  ours = tk.load_tokenizer(files, 77, *pad)
  want = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
  np.testing.assert_array_equal(ours(PROMPTS), want)


def _diffusers_run(pipe, steps: int, guidance: float, seed: int, eta: float | None) -> np.ndarray:
  """The pipeline's latents from our x_T, with our per-step noise injected into its scheduler."""
  h, w = HEIGHT // 8, WIDTH // 8
  idx = np.arange(FRAMES)
  x_t = np.asarray(sampling.initial_noise(seed, idx, (h, w, 4)))  # [T, h, w, c]
  noise = [np.asarray(sampling.frame_noise(seed, i, idx, (h, w, 4))).transpose(0, 3, 1, 2) for i in range(steps)]
  sched, calls = pipe.scheduler, iter(noise)
  step = sched.step

  @functools.wraps(step)  # the pipeline reads the step's signature (eta, generator) through __wrapped__
  def injected(model_output, timestep, sample, *args, **kw):
    kw.pop("generator", None)
    return step(model_output, timestep, sample, *args, variance_noise=torch.from_numpy(next(calls)), **kw)

  sched.step = injected
  kw = {} if eta is None else {"eta": eta}
  try:
    with torch.no_grad():
      out = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        latents=torch.from_numpy(x_t.transpose(3, 0, 1, 2)[None].copy()),
        output_type="latent",
        **kw,
      ).frames
  finally:
    del sched.step
  return np.asarray(out).transpose(0, 2, 3, 4, 1)  # [1, T, h, w, c]


def _ours(weights, **kw) -> np.ndarray:
  cfg = pipeline.GenerationConfig(
    prompts=(PROMPT,),
    weights=str(weights),
    frames=FRAMES,
    height=HEIGHT,
    width=WIDTH,
    num_devices=kw.pop("num_devices", 1),
    dtype="float32",
    frame_chunk=0,
    **kw,
  )
  return pipeline.generate(cfg, log=lambda s: None).latents


@pytest.fixture(scope="module")
def built_dpmpp(built, tmp_path_factory):
  """The same pipeline with Video-Infinity's scheduler (from the folder's config, its 'linspace' default)."""
  tmp = tmp_path_factory.mktemp("t2v_dpmpp")
  pipe = built["pipe"]
  cfg = {**pipe.scheduler.config, "algorithm_type": "sde-dpmsolver++"}
  sched = DPMSolverMultistepScheduler.from_config({k: v for k, v in cfg.items() if k != "timestep_spacing"})
  pipe = TextToVideoSDPipeline(**{**pipe.components, "scheduler": sched})
  _save_pipeline(tmp / "pipe", built["parts"], pipe.tokenizer, sched)
  diffusers_t2v.run(out=str(tmp / "converted"), folder=str(tmp / "pipe"))
  return {"pipe": pipe, "out": tmp / "converted"}


@pytest.mark.parametrize("guidance", [1.0, 9.0])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_sde"])
def test_whole_pipeline_run(request, sampler, guidance):
  """Our generate (one device, full attention) against TextToVideoSDPipeline with the same noise."""
  steps, seed = 4, 3
  b = request.getfixturevalue("built_dpmpp" if sampler == "dpmpp_sde" else "built")
  weights, pipe = b["out"], b["pipe"]
  want = _diffusers_run(pipe, steps, guidance, seed, eta=1.0 if sampler == "ddim" else None)
  got = _ours(weights, sampler=sampler, steps=steps, guidance=guidance, seed=seed, eta=1.0, attention="full")
  err = rel_err(got, want)
  print(f"whole {sampler} run at guidance {guidance} vs TextToVideoSDPipeline: rel err {err:.2e}")
  assert np.isfinite(got).all() and err <= guided_rtol(guidance), err


@pytest.mark.parametrize("guidance", [1.0, 9.0])
def test_dual_scope_on_one_and_four_devices(built, guidance):
  kw = dict(sampler="dpmpp_sde", steps=3, guidance=guidance, seed=1, attention="dual", window=2, num_global=4)
  one, four = _ours(built["out"], num_devices=1, **kw), _ours(built["out"], num_devices=4, **kw)
  err = rel_err(four, one)
  print(f"dual-scope at guidance {guidance}, 4 devices vs 1: rel err {err:.2e}")
  assert one.std() > 0.1 and err <= guided_rtol(guidance), err


# ------------------------------------------------------------------------------------------------
# The samplers on a diffusers schedule, against diffusers' schedulers (no UNet)


def _scheduler_loop(sched, plan, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
  noise = rng.standard_normal((steps, 2, 3, 4, 4)).astype(np.float32)
  model = lambda x, t: np.tanh(x) * 0.7 + 0.1 * x0 * (t / 1000.0)  # any smooth stand-in for a UNet
  sched.set_timesteps(steps)
  np.testing.assert_array_equal(sched.timesteps.numpy(), plan.timesteps)
  ours = sampling.init(plan, x0)
  x = torch.from_numpy(x0)
  for i, t in enumerate(sched.timesteps):
    out = model(x.numpy(), float(t))
    kw = {"eta": 1.0} if isinstance(sched, DDIMScheduler) else {}
    x = sched.step(torch.from_numpy(out), t, x, variance_noise=torch.from_numpy(noise[i]), **kw).prev_sample
    out_ours = model(np.asarray(ours.x), float(plan.timesteps[i]))
    ours = sampling.step(plan, ours, None, out_ours, noise[i])
  return np.asarray(ours.x), x.numpy()


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_sde"])
def test_samplers_follow_the_schedulers(name, prediction, spacing):
  s = schedule_lib.Schedule(kind="diffusers", prediction_type=prediction, timestep_spacing=spacing)
  common = dict(ZEROSCOPE_DDIM, prediction_type=prediction, timestep_spacing=spacing)
  if name == "ddim":
    sched = DDIMScheduler(**common)
  else:
    common.pop("clip_sample"), common.pop("set_alpha_to_one")
    sched = DPMSolverMultistepScheduler(**common, algorithm_type="sde-dpmsolver++")
  steps = 7
  plan = sampling.make_plan(sampling.SamplerConfig(name, steps, 1.0, eta=1.0, schedule=s))
  got, want = _scheduler_loop(sched, plan, steps)
  assert rel_err(got, want) <= RTOL, rel_err(got, want)


# ------------------------------------------------------------------------------------------------
# Refusals by name, variants, the Hugging Face cache


def _edit(folder, component: str, **fields) -> None:
  name = "scheduler_config.json" if component == "scheduler" else "config.json"
  path = folder / component / name if component != "model_index" else folder / "model_index.json"
  d = json.loads(path.read_text())
  d.update(fields)
  path.write_text(json.dumps(d))


@pytest.mark.parametrize(
  "component,fields,named",
  [
    ("unet", {"act_fn": "gelu"}, "act_fn='gelu'"),
    ("unet", {"a_new_field": 1}, "a_new_field=1"),
    ("vae", {"shift_factor": 0.1}, "shift_factor=0.1"),
    ("text_encoder", {"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'"),
    ("scheduler", {"clip_sample": True}, "clip_sample=True"),
    ("scheduler", {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2'"),
    ("model_index", {"safety_checker": ["x", "Checker"]}, "component 'safety_checker'"),
    ("model_index", {"_class_name": "StableDiffusionPipeline"}, "StableDiffusionPipeline"),
  ],
)
def test_what_the_model_cannot_do_is_refused_by_name(built, tmp_path, component, fields, named):
  folder = tmp_path / "pipe"
  shutil.copytree(built["tmp"] / "pipe", folder)
  _edit(folder, component, **fields)
  with pytest.raises(ConversionError, match=named.replace("(", r"\(").replace("[", r"\[")):
    diffusers_t2v.run(out=str(tmp_path / "out"), folder=str(folder))
  assert not (tmp_path / "out").exists()


def test_fp16_variant_and_the_hub_cache(built, tmp_path, monkeypatch):
  """Only fp16 variant files: they convert (the weights are those halves); --hub finds the cached snapshot."""
  import huggingface_hub

  cache = tmp_path / "hub"
  snap = cache / "models--org--tiny-t2v" / "snapshots" / "0123abcd"
  parts = {k: v.half() for k, v in _components().items()}
  _save_pipeline(snap, parts, _tokenizer(tmp_path), DDIMScheduler(**ZEROSCOPE_DDIM), variant="fp16")
  (cache / "models--org--tiny-t2v" / "refs").mkdir()
  (cache / "models--org--tiny-t2v" / "refs" / "main").write_text("0123abcd")
  assert "diffusion_pytorch_model.fp16.safetensors" in os.listdir(snap / "unet")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
    diffusers_t2v.run(out=str(tmp_path / "none"), hub="org/absent")
  diffusers_t2v.run(out=str(tmp_path / "out"), hub="org/tiny-t2v")
  cfg, _ = checkpoint.read_model_dir(tmp_path / "out")
  ours = checkpoint.load_params(tmp_path / "out" / "unet", make_abstract=lambda: unet3d.abstract(cfg.unet))
  want = parts["unet"].conv_in.weight.detach().float().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(np.asarray(ours.input_blocks[0][0].kernel), want)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["source"] == "org/tiny-t2v"
