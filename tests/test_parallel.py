"""Clip parallelism on 8 fake CPU devices: dense references, device-count invariance, official semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vinf_jax import parallel, sampling
from vinf_jax.config import TINY, TemporalConfig
from vinf_jax.layers.attention import dual_scope_attention
from vinf_jax.models import unet3d

# float32; sharded and dense differ only in summation order (psum of partial sums, blocked softmax)
RTOL = 1e-5


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def sharded(fn, d, n_in, axis=2):
  """Run ``fn(*arrays, frames)`` under shard_map on d devices, arrays split along ``axis``."""
  mesh = parallel.make_mesh(d)
  spec = P(*([None] * axis + [parallel.FRAMES]))
  return mesh, spec


# ---------------------------------------------------------------------------------------------
# Dual-scope attention against a dense single-device statement with an explicit mask.


def dense_dual_scope(q, k, v, t, cfg: TemporalConfig):
  """q/k/v [B, M, N, H, D] of the whole video; explicit [N, N+2P+G] mask per batch element."""
  b, m, n, h, d = q.shape
  p, g = cfg.window, cfg.num_global
  zeros = np.zeros((b, m, p, h, d), q.dtype)
  kp, vp = np.concatenate([zeros, k, zeros], 2), np.concatenate([zeros, v, zeros], 2)  # padded index j <-> frame j-P
  gidx = np.arange(g) * (n // g)
  keys, vals = np.concatenate([kp, k[:, :, gidx]], 2), np.concatenate([vp, v[:, :, gidx]], 2)
  out = np.zeros_like(q)
  for bi in range(b):
    mask = np.full((n, n + 2 * p + g), -np.inf)
    for i in range(n):
      for j in range(n + 2 * p):
        frame = j - p
        if abs(frame - i) <= p and (cfg.video_ends == "zeros" or 0 <= frame < n):
          mask[i, j] = cfg.local_bias if t[bi] < cfg.local_phase_below else 0.0
      mask[i, n + 2 * p :] = cfg.global_bias if t[bi] >= cfg.global_phase_from else 0.0
    logits = np.einsum("mqhd,mkhd->mhqk", q[bi], keys[bi]) / np.sqrt(d) + mask
    pr = np.exp(logits - logits.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    out[bi] = np.einsum("mhqk,mkhd->mqhd", pr, vals[bi])
  return out


@pytest.mark.parametrize("ends", ["zeros", "mask"])
@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_dual_scope_attention_matches_dense_reference(d, ends):
  cfg = TemporalConfig(attention="dual", window=3, num_global=8, video_ends=ends)
  rng = np.random.default_rng(d)
  b, m, n, h, hd = 2, 3, 32, 2, 8
  q, k, v = (rng.standard_normal((b, m, n, h, hd), dtype=np.float32) for _ in range(3))
  t = np.array([900.0, 100.0], np.float32)  # one batch element in each phase
  want = dense_dual_scope(q, k, v, t, cfg)
  mesh = parallel.make_mesh(d)
  frames = parallel.frame_context(mesh, cfg)
  spec = P(None, None, parallel.FRAMES)
  f = jax.jit(
    jax.shard_map(
      lambda q, k, v, t: dual_scope_attention(q, k, v, t, frames),
      mesh=mesh,
      in_specs=(spec, spec, spec, P()),
      out_specs=spec,
      check_vma=False,
    )
  )
  got = f(q, k, v, t)
  assert rel_err(got, want) <= RTOL


def test_parallel_scheme_validation():
  dual = TemporalConfig(attention="dual", window=8, num_global=16)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    parallel.check_frames(36, 8, dual)
  with pytest.raises(ValueError, match="window P=8 is larger than the 4 frames"):
    parallel.check_frames(32, 8, dual)
  with pytest.raises(ValueError, match="not divisible by num_global G=16"):
    parallel.check_frames(40, 2, dual)
  with pytest.raises(ValueError, match="at least 4 frames per device"):
    parallel.check_frames(16, 8, TemporalConfig())
  parallel.check_frames(64, 8, dual)  # fine


# ---------------------------------------------------------------------------------------------
# The whole model: the same latents whatever the device count.


def tame(model):
  """Random weights with small residual branches (as trained nets have), so float32 rounding of
  different summation orders is not amplified chaotically over 30 layers and 3 sampler steps."""
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)

  def scale(path, x):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    branch_out = any(s in names for s in ("out_conv", "proj_out", "conv4", "to_out")) or names[-2:-1] == ["out"]
    return x * 0.2 if branch_out and names[-1] == "kernel" else x

  pure = jax.tree_util.tree_map_with_path(scale, pure)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tiny_unet():
  return tame(unet3d.build(TINY.unet, seed=0))


def run_video(model, sampler, d, temporal, n=32, seed=7):
  plan = sampling.make_plan(
    sampling.SamplerConfig(name=sampler, steps=3 if sampler == "dpmpp_sde" else 4, guidance=7.5)
  )
  rng = np.random.default_rng(0)
  ctx_c, ctx_u = (rng.standard_normal((1, 77, TINY.unet.context_dim), dtype=np.float32) for _ in range(2))
  den = parallel.make_denoiser(model, plan, temporal, parallel.make_mesh(d), latent_shape=(1, n, 8, 8, 4))
  state = den.init(jnp.int32(seed))
  for _ in range(3):  # 3 steps of each sampler
    state = den.step(den.params, state, ctx_c, ctx_u, jnp.array([24], jnp.int32), jnp.int32(seed))
  return parallel.gather_to_host(state.x)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_sde"])
def test_device_count_invariance(tiny_unet, sampler):
  temporal = TemporalConfig(attention="dual", window=4, num_global=8, group_norm="global")
  ref = run_video(tiny_unet, sampler, 1, temporal)
  assert np.isfinite(ref).all() and ref.std() > 0.1
  for d in (2, 4, 8):
    err = rel_err(run_video(tiny_unet, sampler, d, temporal), ref)
    print(f"{sampler}: {d} devices vs 1: rel err {err:.2e}")
    assert err <= RTOL, (d, err)
