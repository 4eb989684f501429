"""Samplers: the schedule, DPM-Solver++ SDE against diffusers, DDIM against a float64 transcription of
VideoCrafter2's DDIM, and frame noise that does not depend on the device split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vinf_jax import sampling

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 2, 4, 4, 4)  # [b, t, h, w, c]
GUIDANCE = 7.5
_jit_step = jax.jit(sampling.step)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_printed_values():
  s = sampling.schedule()
  assert len(s) == 13 and all(v.dtype == np.float32 for v in s.values())
  assert f"{s['alphas_cumprod'][0]:.5f}" == "0.99915"
  assert f"{s['alphas_cumprod'][999]:.7f}" == "0.0046601"
  scale = s["scale_arr"]
  assert scale.shape == (1400,)
  assert scale[0] == 1.0 and scale[399] == np.float32(0.7)
  np.testing.assert_array_equal(scale[:400], np.linspace(1.0, 0.7, 400).astype(np.float32))
  np.testing.assert_array_equal(scale[400:], np.full(1000, 0.7, np.float32))
  assert np.all(np.diff(scale[:400]) < 0)


def _torch_register_schedule() -> dict[str, np.ndarray]:
  """lvdm's make_beta_schedule('linear') (torch float64 linspace) + register_schedule + scale_arr."""
  betas = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).numpy()
  alphas = 1.0 - betas
  ac = np.cumprod(alphas, axis=0)
  acp = np.append(1.0, ac[:-1])
  pv = betas * (1.0 - acp) / (1.0 - ac)
  bufs = {
    "betas": betas,
    "alphas_cumprod": ac,
    "alphas_cumprod_prev": acp,
    "sqrt_alphas_cumprod": np.sqrt(ac),
    "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
    "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
    "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
    "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
    "posterior_variance": pv,
    "posterior_log_variance_clipped": np.log(np.maximum(pv, 1e-20)),
    "posterior_mean_coef1": betas * np.sqrt(acp) / (1.0 - ac),
    "posterior_mean_coef2": (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac),
    "scale_arr": np.concatenate([np.linspace(1.0, 0.7, 400), np.full(1000, 0.7)]),
  }
  return {k: torch.tensor(v, dtype=torch.float32).numpy() for k, v in bufs.items()}


def test_check_schedule_buffers_accepts_ldm_buffers():
  sampling.check_schedule_buffers(sampling.schedule())
  sampling.check_schedule_buffers(_torch_register_schedule())


def test_check_schedule_buffers_names_every_bad_buffer():
  bufs = sampling.schedule()
  bufs["posterior_mean_coef2"] = bufs["posterior_mean_coef2"].copy()
  bufs["posterior_mean_coef2"][500] += 1e-4
  bufs["scale_arr"] = bufs["scale_arr"][:1000]
  del bufs["betas"]
  bufs["logvar"] = np.zeros(1000, np.float32)
  with pytest.raises(ValueError) as err:
    sampling.check_schedule_buffers(bufs)
  msg = str(err.value)
  for name in ("posterior_mean_coef2: max |diff| 0.0001", "scale_arr: shape (1000,)", "betas: missing", "logvar"):
    assert name in msg, msg
  assert "alphas_cumprod:" not in msg


# ---------------------------------------------------------------------------------------------- config


def test_sampler_config_validate_lists_every_bad_value():
  sampling.SamplerConfig().validate()
  sampling.SamplerConfig("ddim", 50, 0.0, 0.0, True).validate()
  with pytest.raises(ValueError) as err:
    sampling.SamplerConfig("euler", 0, -1.0, -0.5).validate()
  msg = str(err.value)
  for bad in ("name='euler'", "steps=0", "guidance=-1.0", "eta=-0.5"):
    assert bad in msg, msg


# ---------------------------------------------------------------------------------------------- DPM-Solver++ SDE


def _diffusers_dpm(steps: int):
  sch = diffusers.DPMSolverMultistepScheduler(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    algorithm_type="sde-dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
    prediction_type="epsilon",
    use_karras_sigmas=False,
  )
  sch.set_timesteps(steps)
  return sch


@pytest.mark.parametrize("schedule_from", ["videocrafter2", "diffusers"])
@pytest.mark.parametrize("steps", [3, 5, 30])
def test_dpmpp_sde_matches_diffusers(steps, schedule_from):
  sch = _diffusers_dpm(steps)
  # 'videocrafter2': the checkpoint's schedule (float64 cumprod, then float32), what the pipeline uses;
  # 'diffusers': diffusers' own float32 schedule (torch cumprod of float32 betas), the solver alone.
  abar = sch.alphas_cumprod.numpy() if schedule_from == "diffusers" else None
  plan = sampling.make_plan(sampling.SamplerConfig("dpmpp_sde", steps, GUIDANCE), alphas_cumprod=abar)
  assert sampling.num_steps(plan) == steps
  assert [int(sampling.timestep(plan, i)) for i in range(steps)] == sch.timesteps.tolist()
  assert plan.stochastic

  rng = np.random.default_rng(steps)
  x = rng.standard_normal(SHAPE, dtype=np.float32)
  state, x_ref = sampling.init(plan, jnp.asarray(x)), torch.from_numpy(x)
  for i in range(steps):
    e_u, e_c, z = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(3))
    e = torch.from_numpy(e_u) + GUIDANCE * (torch.from_numpy(e_c) - torch.from_numpy(e_u))
    x_ref = sch.step(e, sch.timesteps[i], x_ref, variance_noise=torch.from_numpy(z)).prev_sample
    state = _jit_step(plan, state, jnp.asarray(e_u), jnp.asarray(e_c), jnp.asarray(z))
    assert int(state.i) == i + 1
    err = _rel(state.x, x_ref.numpy())
    assert err <= 1e-5, f"step {i} (t={int(sch.timesteps[i])}): relative error {err:.3g}"
  # The last step lands on sigma = 0: the sample is the data prediction, with no noise added.
  np.testing.assert_array_equal(np.asarray(state.x), np.asarray(state.x0))
  assert plan.coef_noise[-1] == 0


def test_dpmpp_sde_30_step_timesteps():
  ts = sampling.make_plan(sampling.SamplerConfig("dpmpp_sde", 30)).timesteps.tolist()
  assert ts[:8] == [999, 966, 932, 899, 866, 832, 799, 766]
  assert ts[-3:] == [100, 67, 33] and len(ts) == 30


# ---------------------------------------------------------------------------------------------- DDIM


def _ddim_reference(steps, eta, x, outputs):
  """VideoCrafter2's DDIM (notes section 8), float64, step by step; returns (timesteps, x after each step)."""
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
  abar = np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)  # the float32 buffer
  scale = np.concatenate([np.linspace(1.0, 0.7, 400), np.full(1000, 0.7)]).astype(np.float32).astype(np.float64)
  c = 1000 // steps
  ddim_ts = np.arange(0, 1000, c) + 1
  total = len(ddim_ts)
  x = x.astype(np.float64)
  seen, xs = [], []
  for k in range(total):
    index = total - k - 1
    t = ddim_ts[index]
    a_t = abar[t]
    a_prev = abar[ddim_ts[index - 1]] if index > 0 else abar[0]
    s_t = scale[t]
    s_prev = scale[ddim_ts[index - 1]] if index > 0 else scale[0]
    sigma_t = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    e_u, e_c, z = (o.astype(np.float64) for o in outputs[k])
    e = e_u + GUIDANCE * (e_c - e_u)
    x0_hat = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    x0_hat = x0_hat / s_t
    direction = np.sqrt(1 - a_prev - sigma_t**2) * e
    x = np.sqrt(a_prev) * s_prev * x0_hat + direction + sigma_t * z
    seen.append(int(t))
    xs.append(x)
  return seen, xs


def test_ddim_timesteps():
  ts = lambda s, exact=False: sampling.make_plan(sampling.SamplerConfig("ddim", s, ddim_exact_steps=exact)).timesteps
  assert ts(50).tolist() == list(range(981, 0, -20))
  assert ts(50).tolist()[:3] == [981, 961, 941] and ts(50).tolist()[-1] == 1
  assert ts(25).tolist() == list(range(961, 0, -40))
  assert ts(30).tolist() == list(range(991, 0, -33)) and len(ts(30)) == 31  # VideoCrafter2's quirk
  assert len(ts(60)) == 63
  assert ts(30, True).tolist() == list(range(958, 0, -33)) and len(ts(30, True)) == 30
  # The exact variant is diffusers' DDIM 'leading' spacing with steps_offset=1.
  ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
  for s in (25, 30, 50):
    ddim.set_timesteps(s)
    assert ts(s, True).tolist() == ddim.timesteps.tolist()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [25, 30, 50])
def test_ddim_matches_float64_transcription(steps, eta):
  plan = sampling.make_plan(sampling.SamplerConfig("ddim", steps, GUIDANCE, eta=eta))
  n = sampling.num_steps(plan)
  assert plan.stochastic == (eta > 0)
  rng = np.random.default_rng(steps)
  x = rng.standard_normal(SHAPE, dtype=np.float32)
  outputs = [[rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(3)] for _ in range(n)]
  seen, want = _ddim_reference(steps, eta, x, outputs)
  assert [int(sampling.timestep(plan, i)) for i in range(n)] == seen

  state = sampling.init(plan, jnp.asarray(x))
  for i, (e_u, e_c, z) in enumerate(outputs):
    noise = jnp.asarray(z) if eta > 0 else None  # a deterministic plan needs no noise
    state = _jit_step(plan, state, jnp.asarray(e_u), jnp.asarray(e_c), noise)
    err = _rel(state.x, want[i])
    assert err <= 1e-5, f"step {i} (t={seen[i]}): relative error {err:.3g}"


def test_ddim_sigmas_match_notes():
  sig = sampling.make_plan(sampling.SamplerConfig("ddim", 50, eta=1.0)).coef_noise
  assert abs(sig[-1] - 0.0206) < 1e-4  # the last step (t=1 -> abar[0]) still adds noise
  assert abs(sig.max() - 0.454) < 1e-3 and int(np.argmax(sig)) == 0


def test_step_needs_noise_when_stochastic():
  plan = sampling.make_plan(sampling.SamplerConfig("ddim", 25, eta=1.0))
  state = sampling.init(plan, jnp.zeros(SHAPE))
  with pytest.raises(ValueError, match="pass `noise`"):
    sampling.step(plan, state, None, jnp.zeros(SHAPE))


def test_step_traces_with_plan_as_argument_or_constant():
  plan = sampling.make_plan(sampling.SamplerConfig("dpmpp_sde", 5, GUIDANCE))
  rng = np.random.default_rng(0)
  x, e_u, e_c, z = (jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32)) for _ in range(4))

  def loop(p):
    body = lambda _, s: sampling.step(p, s, e_u, e_c, z)
    return jax.lax.fori_loop(0, sampling.num_steps(p), body, sampling.init(p, x)).x

  eager = sampling.init(plan, x)
  for _ in range(5):
    eager = sampling.step(plan, eager, e_u, e_c, z)
  np.testing.assert_allclose(jax.jit(loop)(plan), eager.x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda: loop(plan))(), eager.x, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- noise

FRAME = (3, 5, 4)  # [h, w, c]


def test_frame_noise_does_not_depend_on_the_split():
  def per_device(_):  # as under shard_map: each of 2 "devices" computes its global indices from axis_index
    idx = jax.lax.axis_index("frames") * 4 + jnp.arange(4)
    return sampling.frame_noise(7, 3, idx, FRAME), sampling.initial_noise(7, idx, FRAME)

  @jax.jit  # one compilation for everything: threefry compiles slowly on CPU
  def draw(seed, step, frames):
    sharded, sharded_init = jax.vmap(per_device, axis_name="frames")(jnp.arange(2))
    return dict(
      whole=sampling.frame_noise(seed, step, frames, FRAME),
      halves=jnp.concatenate(
        [sampling.frame_noise(seed, step, frames[:4], FRAME), sampling.frame_noise(seed, step, frames[4:], FRAME)]
      ),
      sharded=sharded.reshape(8, *FRAME),
      init=sampling.initial_noise(seed, frames, FRAME),
      sharded_init=sharded_init.reshape(8, *FRAME),
      next_step=sampling.frame_noise(seed, step + 1, frames, FRAME),
      next_seed=sampling.frame_noise(seed + 1, step, frames, FRAME),
    )

  n = {k: np.asarray(v) for k, v in draw(7, 3, jnp.arange(8)).items()}
  assert n["whole"].shape == (8, *FRAME) and n["whole"].dtype == np.float32
  np.testing.assert_array_equal(n["halves"], n["whole"])
  np.testing.assert_array_equal(n["sharded"], n["whole"])
  np.testing.assert_array_equal(n["sharded_init"], n["init"])
  for other in ("next_step", "next_seed", "init"):
    assert not np.any(n[other] == n["whole"]), other
  assert not np.any(n["whole"][0] == n["whole"][1])


def test_batch_noise_adds_videos():
  @jax.jit
  def draw(frames):
    return dict(
      batch=sampling.batch_frame_noise(1, 0, frames, FRAME, 2),
      v0=sampling.frame_noise(1, 0, frames, FRAME),
      v1=sampling.frame_noise(1, 0, frames, FRAME, video_index=1),
      batch_init=sampling.batch_initial_noise(1, frames, FRAME, 2, first_video=1),
      init1=sampling.initial_noise(1, frames, FRAME, video_index=1),
    )

  n = {k: np.asarray(v) for k, v in draw(jnp.arange(2, 6)).items()}
  assert n["batch"].shape == (2, 4, *FRAME)
  np.testing.assert_array_equal(n["batch"][0], n["v0"])
  np.testing.assert_array_equal(n["batch"][1], n["v1"])
  assert not np.any(n["v0"] == n["v1"])
  np.testing.assert_array_equal(n["batch_init"][0], n["init1"])
  assert abs(n["batch_init"].mean()) < 0.2 and abs(n["batch_init"].std() - 1) < 0.2
