"""The dual-scope attention's Pallas window kernel on CPU, through Pallas' interpreter: both of its plans
against the dense statement on 1, 2 and 4 fake devices, where it is chosen, what it refuses, and the whole
tiny UNet with and without it. (Its speed and bf16 error on a GPU: benchmarks.attention_check --window_kernel.)"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_parallel import RTOL, dense_dual_scope, rel_err, run_video, sharded_over_frames, tame
from vinf_jax import parallel
from vinf_jax.config import TINY, TemporalConfig
from vinf_jax.models import unet3d


@pytest.mark.parametrize("ends", ["zeros", "mask"])
@pytest.mark.parametrize(
  "d, n, p, g, qb",
  [
    (1, 32, 4, 4, 0),  # 'merged': one device, one block
    (1, 16, 8, 16, 0),
    (1, 64, 3, 8, 16),  # 'blocked': four blocks of 16 on one device, 2 window chunks, 8 globals padded to 16
    (2, 64, 8, 16, 0),  # one block of 32 per device, halos from the neighbours
    (4, 64, 12, 8, 0),  # 16 per device, a window of 40 keys: 3 chunks of 16
  ],
)
def test_window_kernel_matches_dense_reference(d, n, p, g, qb, ends):
  """The Pallas window kernel (through its interpreter) in both plans against the dense statement."""
  from vinf_jax.layers.attention import dual_scope_attention_kernel, window_kernel_plan

  cfg = TemporalConfig(attention="dual", window=p, num_global=g, video_ends=ends, query_block=qb)
  rng = np.random.default_rng(n + p + d)
  b, m, h, hd = 2, 3, 2, 16  # Triton's dots: head dim a power of two >= 16
  q, k, v = (rng.standard_normal((b, m, n, h, hd), dtype=np.float32) for _ in range(3))
  t = np.array([900.0, 100.0], np.float32)  # one batch element in each phase
  want = dense_dual_scope(q, k, v, t, cfg)
  mesh = parallel.make_mesh(d)
  frames = parallel.frame_context(mesh, cfg)
  plan = window_kernel_plan(frames, n // d, hd)
  assert plan == ("merged" if d == 1 and not qb else "blocked")
  assert window_kernel_plan(frames, n // d, 8) is None  # head dim 8: the XLA / cuDNN paths
  fn = lambda q, k, v, t: dual_scope_attention_kernel(q, k, v, t, frames, interpret=True)
  got = sharded_over_frames(fn, mesh, q, k, v, t)
  assert rel_err(got, want) <= RTOL


def test_window_kernel_is_chosen_only_where_asked(monkeypatch):
  from vinf_jax.layers import attention
  from vinf_jax.layers.transformers import TemporalTransformer

  frames = parallel.FrameContext(TemporalConfig(attention="dual", window=4, num_global=8))
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  cpu = TemporalTransformer(32, 2, 16, 32, attention_impl="xla", kernel_impl="jax", **kw)
  gpu = TemporalTransformer(32, 2, 16, 32, attention_impl="cudnn", kernel_impl="pallas", **kw)  # as on an H100
  narrow = TemporalTransformer(32, 4, 8, 32, attention_impl="cudnn", kernel_impl="pallas", **kw)  # head dim 8
  assert attention.TEMPORAL_KERNEL == "on"  # the default: on GPUs, where it applies
  monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "off")
  assert not gpu._window_kernel(frames, 32)
  monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "on")
  assert gpu._window_kernel(frames, 32) and not cpu._window_kernel(frames, 32) and not narrow._window_kernel(frames, 32)
  assert not gpu._window_kernel(frames, 24)  # 24 frames: no power-of-two block
  two = parallel.FrameContext(TemporalConfig(attention="dual", window=4, num_global=8, query_block=16))
  assert gpu._window_kernel(two, 32)  # two blocks of 16: the blocked form
  monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "merged")
  assert gpu._window_kernel(frames, 32) and not gpu._window_kernel(two, 32) and not cpu._window_kernel(frames, 32)
  monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "interpret")
  assert cpu._window_kernel(frames, 32) and not narrow._window_kernel(frames, 32)
  monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "auto")
  with pytest.raises(ValueError, match="TEMPORAL_KERNEL='auto', expected 'off', 'on', 'merged' or 'interpret'"):
    gpu._window_kernel(frames, 32)


def test_window_kernel_refuses_what_it_cannot_take():
  from vinf_jax.layers import kernels

  x = jnp.zeros((1, 32, 2, 16))
  with pytest.raises(ValueError, match="do not agree"):
    kernels.window_attention(x, x, x, jnp.zeros((1, 2, 2, 16, 16)))  # 2 chunks need 48 window rows
  with pytest.raises(ValueError, match="block 24, head dim 16"):
    y = jnp.zeros((1, 24, 2, 16))
    kernels.window_attention(y, y, y, jnp.zeros((1, 1, 1, 24, 24)))


def test_window_kernel_in_the_whole_model(monkeypatch):
  """The tiny UNet with heads of 16 (the kernel's smallest): 3 DDIM steps with the window kernel (interpreted)
  against the same steps without it, on 1 device (the 'merged' plan) and 2 (the 'blocked' plan)."""
  from vinf_jax.layers import attention, kernels

  traced = []
  real = kernels.window_attention
  monkeypatch.setattr(kernels, "window_attention", lambda *a, **kw: traced.append(a[0].shape) or real(*a, **kw))

  unet = dataclasses.replace(TINY.unet, num_head_channels=16)
  model = tame(unet3d.build(unet, seed=0))
  temporal = TemporalConfig(attention="dual", window=4, num_global=8, group_norm="global")
  for d, n in ((1, 16), (2, 32)):  # 16 frames a device: the kernel's smallest block
    monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "off")
    ref = run_video(model, "ddim", d, temporal, n=n)
    monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "interpret")
    traced.clear()
    err = rel_err(run_video(model, "ddim", d, temporal, n=n), ref)
    assert len(traced) >= 2, traced  # the temporal transformers' attentions ran through it
    print(f"window kernel, {d} devices: rel err {err:.2e}")
    assert np.isfinite(ref).all() and err <= RTOL, (d, err)


@pytest.mark.parametrize("per_program", [1, 2, 4])
def test_window_kernel_tuning_changes_only_the_grid(monkeypatch, per_program):
  """Fewer problems a program (kernels.WINDOW_TUNING, chosen per form on a GPU) give the same result in both
  forms, including a problem count that the setting does not divide (6 problems, 4 a program: 2 are taken)."""
  from vinf_jax.layers import kernels
  from vinf_jax.layers.attention import dual_scope_attention_kernel

  rng = np.random.default_rng(per_program)
  t = np.array([900.0, 100.0], np.float32)
  for n, qb in ((32, 0), (64, 16)):  # 'merged', 'blocked'
    cfg = TemporalConfig(attention="dual", window=4, num_global=8, query_block=qb)
    q, k, v = (rng.standard_normal((2, 3, n, 2, 16), dtype=np.float32) for _ in range(3))
    frames = parallel.frame_context(parallel.make_mesh(1), cfg)
    monkeypatch.setattr(kernels, "WINDOW_TUNING", {"merged": (per_program, 2), "blocked": (per_program, 2)})
    fn = lambda q, k, v, t, frames=frames: dual_scope_attention_kernel(q, k, v, t, frames, interpret=True)
    got = sharded_over_frames(fn, parallel.make_mesh(1), q, k, v, t)
    assert rel_err(got, dense_dual_scope(q, k, v, t, cfg)) <= RTOL, (n, per_program)
  assert kernels._heads_per_program(6, 4) == 2 and kernels._heads_per_program(40, 8) == 8
  assert kernels._heads_per_program(143 * 5, 8) == 1


def test_window_kernel_in_bfloat16_adds_no_error(monkeypatch):
  """One UNet call of the tiny UNet (heads of 16, 16 frames, one device: the merged form; batch 2 at a global-
  and a local-phase timestep) computing in bfloat16, with the window kernel (interpreted: bf16 probabilities
  for the second product, float32 accumulation) and without it (XLA), and the same bf16-rounded weights
  computed in float32: the kernel's error against float32 is at most 1.5x that of the path it replaces (two
  orders of bf16 rounding of one computation give errors of one size). benchmarks/step_check.py's fixed 1e-2 is
  not asserted here: the tiny random UNet's bf16 error is itself about 1e-2 on either path (1.08e-2 without the
  kernel at t 999), so the two bf16 versions also differ by about that much."""
  import jax

  from vinf_jax.layers import attention

  unet = dataclasses.replace(TINY.unet, num_head_channels=16, dtype="bfloat16", param_dtype="bfloat16")
  bf16 = tame(unet3d.build(unet, seed=0))
  graphdef32, _ = nnx.split(unet3d.abstract(dataclasses.replace(unet, dtype="float32", param_dtype="float32")))
  f32 = nnx.merge(graphdef32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(bf16)))
  frames = parallel.FrameContext(TemporalConfig(attention="dual", window=4, num_global=8))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 16, 8, 8, unet.in_channels)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 77, unet.context_dim)), jnp.float32)
  t, fps = jnp.asarray([999.0, 500.0], jnp.float32), jnp.asarray([24, 24], jnp.int32)
  eps = lambda m: np.asarray(m(x, t, ctx, fps, frames=frames), np.float32)
  monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "off")
  ref, plain = eps(f32), eps(bf16)
  monkeypatch.setattr(attention, "TEMPORAL_KERNEL", "interpret")
  kernel = eps(bf16)
  for i, phase in enumerate(("global", "local")):
    e_k, e_p, e_kp = rel_err(kernel[i], ref[i]), rel_err(plain[i], ref[i]), rel_err(kernel[i], plain[i])
    print(f"{phase} phase, bf16 vs float32: window kernel {e_k:.2e}, without it {e_p:.2e}; kernel vs plain {e_kp:.2e}")
    assert np.isfinite(ref[i]).all() and 0 < e_k <= 1.5 * e_p, (phase, e_k, e_p, e_kp)
