"""precision='fp8': the e4m3 matmul against float32, the UNet in fp8 against float32, the default path untouched,
the --precision flag and its validation."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import fp8_check
from vinf_jax import pipeline, sample
from vinf_jax.config import TINY
from vinf_jax.layers import fp8
from vinf_jax.models import tame_residuals, unet3d

# e4m3 keeps 3 mantissa bits: round-to-nearest has relative error at most u = 2^-4 on normal values.
U = 2.0**-4
# Below e4m3's smallest normal (2^-6, in units of the scale) the spacing is 2^-9: absolute error <= 2^-10 * scale.
SUBNORMAL_ABS = 2.0**-10
# The UNet in fp8 against float32 (max |a - b| / max |b| of its output): 2u, as much as ONE worst-case fp8 product
# (two operands each off by u). Every token-wise linear layer adds its own fp8 error, but the tamed network
# (residual branches at 0.2 of their input, as trained ones are small) does not amplify it, and independent
# errors of many layers partly cancel: measured 0.03-0.04 on this model (bf16 alone: ~0.013).
UNET_FP8_TOL = 2 * U
# The tiny model cut to two levels of one ResBlock (every kind of layer still runs): a third of the compile time.
CFG = dataclasses.replace(
  TINY.unet, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), dtype="float32", param_dtype="float32"
)


SMALL = ("--frames=8", "--height=64", "--width=64", "--window=2", "--num_global=4")


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_fp8_matmul_within_the_e4m3_rounding_bound():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((96, 320)).astype(np.float32) * np.exp(rng.standard_normal((96, 1))).astype(np.float32)
  w = (rng.standard_normal((320, 160)) / np.sqrt(320)).astype(np.float32)
  lin = fp8.Fp8Linear(jnp.asarray(w), None, dtype=jnp.float32)
  assert lin.kernel_t[...].dtype == jnp.float8_e4m3fn and lin.kernel_t[...].shape == (160, 320)
  np.testing.assert_allclose(float(lin.kernel_scale[...]), np.abs(w).max() / 448, rtol=1e-6)  # once, at build
  y = np.asarray(jax.jit(lin.__call__)(jnp.asarray(x)))
  ref = x.astype(np.float64) @ w.astype(np.float64)
  # |x^ w^ - x w| <= |x^ - x| (|w| + |w^ - w|) + |x| |w^ - w|, each operand off by max(u |v|, 2^-10 scale)
  ex = np.maximum(U * np.abs(x), SUBNORMAL_ABS * np.abs(x).max() / 448)
  ew = np.maximum(U * np.abs(w), SUBNORMAL_ABS * np.abs(w).max() / 448)
  bound = ex @ (np.abs(w) + ew) + np.abs(x) @ ew
  bound *= 1 + 320 * 2.0**-24  # float32 accumulation of K products
  assert np.all(np.abs(y - ref) <= bound)
  err = rel_err(y, ref)
  assert 1e-3 < err < 2 * U  # really quantised (in float32 it would be ~1e-7)


def test_fp8_matmul_saturates_and_handles_zeros():
  w = jnp.eye(32, dtype=jnp.float32)
  lin = fp8.Fp8Linear(w, jnp.zeros((32,)), dtype=jnp.float32)
  assert np.all(np.asarray(lin(jnp.zeros((4, 32)))) == 0)  # an all-zero activation: scale floored, no NaN
  x = jnp.asarray(np.linspace(-1e4, 1e4, 32, dtype=np.float32))[None]
  y = np.asarray(lin(x))
  assert np.isfinite(y).all() and rel_err(y, x) <= U


@pytest.fixture(scope="module")
def runs():
  """Outputs of one guided UNet call (batch 2: both CFG branches) in float32 and in fp8 (bf16 compute), from the
  same float32 weights; computed lazily, each once."""
  model = tame_residuals(pipeline.random_model(unet3d.UNet3D, CFG, 0))
  rng = np.random.default_rng(1)
  args = (
    jnp.asarray(rng.standard_normal((2, 4, 8, 8, 4)), jnp.float32),
    jnp.full((2,), 999.0),
    jnp.asarray(rng.standard_normal((2, 77, CFG.context_dim)), jnp.float32),
    jnp.asarray([24, 24]),
  )
  graph16, _ = nnx.split(unet3d.abstract(dataclasses.replace(CFG, dtype="bfloat16")))
  bf16 = nnx.merge(graph16, nnx.state(model))
  models = {"float32": lambda: model, "fp8": lambda: unet3d.with_precision(bf16, "fp8")}
  cache = {}

  def get(name):
    if name not in cache:
      g, p = nnx.split(models[name]())
      cache[name] = np.asarray(jax.jit(lambda p, *a: nnx.merge(g, p)(*a))(p, *args))
    return cache[name]

  get.model, get.args = model, args
  return get


def test_unet_fp8_against_float32(runs):
  ref, f8 = runs("float32"), runs("fp8")
  assert np.isfinite(f8).all()
  err = rel_err(f8, ref)
  print(f"UNet in fp8 against float32: {err:.3e} (bound {UNET_FP8_TOL})")
  assert err <= UNET_FP8_TOL


def test_default_precision_is_the_unchanged_model(runs):
  model = runs.model
  assert unet3d.with_precision(model, "default") is model  # what load_models gets for the default: no copy
  assert not any(isinstance(m, fp8.Fp8Linear) for _, m in nnx.iter_modules(model))
  x = (jnp.zeros((2, 1, 8, 8, 4)), jnp.full((2,), 999.0), jnp.zeros((2, 77, CFG.context_dim)), jnp.asarray([24, 24]))
  jaxpr = str(jax.make_jaxpr(lambda *a: model(*a))(*x))
  assert "f8" not in jaxpr  # no fp8 op in the default program
  q = unet3d.with_precision(model, "fp8")
  assert "f8_e4m3fn" in str(jax.make_jaxpr(lambda *a: q(*a))(*x))
  assert unet3d.is_fp8(q) and not unet3d.is_fp8(model) and q.cfg.precision == "fp8"
  # per transformer: proj_in, proj_out, two attentions' q/k/v/out, the feed-forward's proj and out
  blocks = sum(isinstance(m, unet3d.SpatialTransformer | unet3d.TemporalTransformer) for _, m in nnx.iter_modules(q))
  assert sum(isinstance(m, fp8.Fp8Linear) for _, m in nnx.iter_modules(q)) == 12 * blocks == 12 * 15
  assert isinstance(q.time_embed.linear_1, nnx.Linear)  # the embedding MLPs stay in the compute dtype
  with pytest.raises(ValueError, match="already fp8"):
    unet3d.with_precision(q, "default")
  wrong = nnx.clone(model)
  wrong.cfg = dataclasses.replace(CFG, precision="fp8")
  with pytest.raises(ValueError, match="not quantised"):
    wrong(*x)


def test_precision_flag_validation_and_sidecar(tmp_path):
  sample.parse_flags(["sample", "--model=tiny", "--prompt=a", "--precision=fp8", "--num_devices=1", *SMALL])
  cfg = sample.config_from_flags()
  assert cfg.precision == "fp8" and cfg.resolved_dtype() == "bfloat16"  # auto: bfloat16 with fp8, on CPU too
  plan = pipeline.validate(cfg)
  assert plan.model.unet.precision == "fp8" and plan.dtype == "bfloat16"
  from vinf_jax.pipeline import outputs

  side = outputs.make_sidecar(cfg, plan, plan.model, 1, {})
  assert side["settings"]["precision"] == "fp8" and side["model"]["unet"]["precision"] == "fp8"
  bad = dataclasses.replace(cfg, dtype="float32")
  with pytest.raises(ValueError, match="precision='fp8' with dtype='float32'"):
    pipeline.validate(bad)
  with pytest.raises(ValueError, match="precision='fp4'"):
    pipeline.validate(dataclasses.replace(cfg, precision="fp4"))
  sample.parse_flags(["sample", "--model=tiny", "--prompt=a"])
  assert sample.config_from_flags().precision == "default"


SMOKE = ["fp8_check", "--model=tiny", "--shrink", *(f"--{a}" for a in ("ref_frames=8", "guided_steps=1", "timed=1"))]


@pytest.mark.slow  # two compiles of the (cut) tiny model's guided step: ~40 s on 2 cores
def test_fp8_check_cpu_smoke(tmp_path, capsys):
  out = tmp_path / "fp8.json"
  args = [*SMOKE, *SMALL, "--parts=speed", f"--out={out}"]
  assert fp8_check.main(args) == 0
  res = json.loads(out.read_text())
  runs = res["runs"]
  assert set(runs) == {"speed/bfloat16", "speed/fp8"} and all(r["finite"] for r in runs.values())
  assert runs["speed/fp8"]["fp8_gemms"] == 0  # no cuBLAS on CPU: the count is the GPU's evidence
  err = res["errors"]["guided_1_steps_F8"]["fp8_vs_bf16"]
  assert 0 < err["max_rel"] < 2 * U
  assert "ms/frame-step" in capsys.readouterr().out


def test_fp8_check_fails_soft(tmp_path, monkeypatch, capsys):
  """A precision that does not compile is a recorded error; the others' figures and errors stay."""
  lat = np.ones((1, 8, 8, 8, 4), np.float32)

  def fake_sample(model, sampler, steps, frames, a, hlo=False):
    if model == "fp8":
      raise RuntimeError("INTERNAL: no fp8 GEMM for you")
    rec = {"frames": frames, "ms_per_step": 10.0, "ms_per_frame_step": 10.0 / frames, "compile_s": 1.0}
    return rec | {"latents": lat * (1.01 if model == "bfloat16" else 1.0), "finite": True}

  monkeypatch.setattr(fp8_check, "models_of", lambda name, seed, shrink=False: {p: p for p in fp8_check.PRECISIONS})
  monkeypatch.setattr(fp8_check, "sample", fake_sample)
  out = tmp_path / "fp8.json"
  assert fp8_check.main([*SMOKE, *SMALL, f"--out={out}"]) == 0
  res = json.loads(out.read_text())
  assert "no fp8 GEMM" in res["runs"]["guided/fp8"]["error"] and "error" not in res["runs"]["guided/float32"]
  assert res["errors"]["guided_1_steps_F8"] == {
    "bf16_vs_f32": {"max_rel": pytest.approx(0.01), "rms_rel": pytest.approx(0.01)}
  }
  assert "FAILED" in capsys.readouterr().out
