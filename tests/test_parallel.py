"""Clip parallelism on 8 fake CPU devices: dense references, device-count invariance, official semantics."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vinf_jax import parallel, sampling
from vinf_jax.config import TINY, TemporalConfig
from vinf_jax.layers.attention import dual_scope_attention
from vinf_jax.layers.resnet import TemporalConvBlock
from vinf_jax.models import tame_residuals, unet3d

# float32; sharded and dense differ only in summation order (psum of partial sums, blocked softmax)
RTOL = 1e-5


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


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
@pytest.mark.parametrize("n, p, g", [(16, 4, 4), (12, 2, 3), (8, 8, 2)])
def test_zero_key_attention_matches_dense_reference(n, p, g, ends):
  """One device, one query block: the clip's own frames plus one zero key, with merged biases."""
  from vinf_jax.layers.attention import dual_scope_attention_zero_key, uses_zero_key

  cfg = TemporalConfig(attention="dual", window=p, num_global=g, video_ends=ends)
  frames = parallel.FrameContext(cfg)
  assert uses_zero_key(frames, n) and not uses_zero_key(parallel.FrameContext(cfg, parallel.FRAMES, 2), n)
  rng = np.random.default_rng(n * 10 + p)
  q, k, v = (rng.standard_normal((2, n, 3, 2, 8)).astype(np.float32) for _ in range(3))
  t = np.array([900.0, 100.0], np.float32)  # one batch element in each phase
  want = dense_dual_scope(*(x.transpose(0, 2, 1, 3, 4) for x in (q, k, v)), t, cfg).transpose(0, 2, 1, 3, 4)
  zero = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)  # [B, T+1, ...]
  got = dual_scope_attention_zero_key(jnp.asarray(q), zero(k), zero(v), jnp.asarray(t), frames)
  assert got.shape == (2, n, 3, 2, 8)
  assert rel_err(got, want) <= RTOL
  with pytest.raises(ValueError, match="keys of 16 and values of 17 frames for 16 query frames: expected 17"):
    dual_scope_attention_zero_key(
      jnp.zeros((1, 16, 1, 1, 8)), jnp.zeros((1, 16, 1, 1, 8)), jnp.zeros((1, 17, 1, 1, 8)), 0.0, frames
    )


@pytest.mark.parametrize("ends", ["zeros", "mask"])
@pytest.mark.parametrize("d, qb", [(1, 0), (2, 0), (4, 0), (8, 0), (1, 8), (2, 4)])
def test_dual_scope_attention_matches_dense_reference(d, qb, ends):
  """qb: query blocks of that many frames (0: automatic, one block per device here)."""
  cfg = TemporalConfig(attention="dual", window=3, num_global=8, video_ends=ends, query_block=qb)
  rng = np.random.default_rng(d)
  b, m, n, h, hd = 2, 3, 32, 2, 8
  q, k, v = (rng.standard_normal((b, m, n, h, hd), dtype=np.float32) for _ in range(3))
  t = np.array([900.0, 100.0], np.float32)  # one batch element in each phase
  want = dense_dual_scope(q, k, v, t, cfg)
  mesh = parallel.make_mesh(d)
  frames = parallel.frame_context(mesh, cfg)
  got = sharded_over_frames(lambda q, k, v, t: dual_scope_attention(q, k, v, t, frames), mesh, q, k, v, t)
  assert rel_err(got, want) <= RTOL


def sharded_over_frames(fn, mesh, q, k, v, t):
  """``fn(q, k, v, t)`` under shard_map over the frames mesh, on [B, M, T, H, D] arrays (the references'
  layout) split along T in the implementation's [B, T, M, H, D]; t: [B] timesteps, replicated."""
  spec = P(None, parallel.FRAMES)
  f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec, check_vma=False))
  return f(*(x.transpose(0, 2, 1, 3, 4) for x in (q, k, v)), t).transpose(0, 2, 1, 3, 4)


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


tame = tame_residuals  # tests/test_sample.py imports it from here


@pytest.fixture(scope="module")
def tiny_unet():
  return tame(unet3d.build(TINY.unet, seed=0))


def run_video(model, sampler, d, temporal, n=32, seed=7):
  plan = sampling.make_plan(
    sampling.SamplerConfig(name=sampler, steps=3 if sampler == "dpmpp_sde" else 4, guidance=7.5)
  )
  rng = np.random.default_rng(0)
  ctx_c, ctx_u = (rng.standard_normal((1, 77, TINY.unet.context_dim), dtype=np.float32) for _ in range(2))
  mesh = parallel.make_mesh(d)  # d=None: every device of every process
  den = parallel.make_denoiser(model, plan, temporal, mesh, latent_shape=(1, n, 8, 8, 4))
  ctx_c, ctx_u, fps, seed_ = (
    parallel.replicate(a, mesh) for a in (ctx_c, ctx_u, np.array([24], np.int32), np.int32(seed))
  )
  state = den.init(seed_)
  for _ in range(3):  # 3 steps of each sampler
    state = den.step(den.params, state, ctx_c, ctx_u, fps, seed_)
  return parallel.gather_to_host(state.x)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_sde"])
def test_device_count_invariance(tiny_unet, sampler):
  temporal = TemporalConfig(attention="dual", window=4, num_global=8, group_norm="global")
  ref = run_video(tiny_unet, sampler, 1, temporal)
  assert np.isfinite(ref).all() and ref.std() > 0.1
  # DDIM on 2 devices (one neighbour each) and 8 (4 frames each: the window's halo is a whole clip); the
  # SDE sampler's noise per global frame has its own split test (test_sampling), so its step on 8 only
  for d in (2, 8) if sampler == "ddim" else (8,):
    err = rel_err(run_video(tiny_unet, sampler, d, temporal), ref)
    print(f"{sampler}: {d} devices vs 1: rel err {err:.2e}")
    assert err <= RTOL, (d, err)


# ---------------------------------------------------------------------------------------------
# Official semantics: per-device statistics and zero sinks, restated the way the official plugin
# computes them (method notes, section 2), one rank at a time.


def _official_conv_rank(x, r, f, stages):
  """ConvLayerPlugin on rank r: 4-frame halos (zeros at the ends), window statistics, crop."""
  n = x.shape[1]
  zeros = np.zeros_like(x[:, :4])
  left = x[:, r * f - 4 : r * f] if r > 0 else zeros
  right = x[:, (r + 1) * f : (r + 1) * f + 4] if (r + 1) * f < n else zeros
  h = np.concatenate([left, x[:, r * f : (r + 1) * f], right], 1)  # [B, F+8, H, W, C]
  for scale, bias, kernel, kbias in stages:
    b, t, hh, ww, c = h.shape
    g = h.reshape(b, t, hh, ww, 32, c // 32)
    mu = g.mean(axis=(1, 2, 3, 5), keepdims=True)
    var = g.var(axis=(1, 2, 3, 5), keepdims=True)
    a = ((g - mu) / np.sqrt(var + 1e-5)).reshape(h.shape) * scale + bias
    a = a / (1 + np.exp(-a))
    ap = np.concatenate([np.zeros_like(a[:, :1]), a, np.zeros_like(a[:, :1])], 1)
    h = sum(np.einsum("bthwc,cd->bthwd", ap[:, j : j + t], kernel[j]) for j in range(3)) + kbias
  return x[:, r * f : (r + 1) * f] + h[:, 4 : 4 + f]


def test_official_temporal_conv_semantics_on_two_devices():
  rng = np.random.default_rng(0)
  block = TemporalConvBlock(64, 32, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  stages = []
  for s in (block.conv1, block.conv2, block.conv3, block.conv4):
    s.norm.scale[...] = 1 + 0.2 * rng.standard_normal(64).astype(np.float32)
    s.norm.bias[...] = 0.2 * rng.standard_normal(64).astype(np.float32)
    s.conv.bias[...] = 0.1 * rng.standard_normal(64).astype(np.float32)
    stages.append(
      tuple(np.asarray(a) for a in (s.norm.scale[...], s.norm.bias[...], s.conv.kernel[...], s.conv.bias[...]))
    )
  x = rng.standard_normal((2, 16, 3, 2, 64), dtype=np.float32)
  want = np.concatenate([_official_conv_rank(x, r, 8, stages) for r in range(2)], 1)
  mesh = parallel.make_mesh(2)
  frames = parallel.frame_context(mesh, TemporalConfig(group_norm="local"))
  spec = P(None, parallel.FRAMES)
  f = jax.jit(jax.shard_map(lambda x: block(x, frames), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
  assert rel_err(f(x), want) <= RTOL
  # and 'global' statistics differ from it (the official code does not synchronise GroupNorm)
  exact = parallel.frame_context(mesh, TemporalConfig(group_norm="global"))
  g = jax.jit(jax.shard_map(lambda x: block(x, exact), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
  assert rel_err(g(x), want) > 1e-3


def _sharded_dual_scope(mesh, frames, t, q, k, v):
  """dual_scope_attention at timestep t over the frames mesh, on [B, M, T, H, D] arrays (the official
  restatements' layout) split along T."""
  fn = lambda q, k, v, tt: dual_scope_attention(q, k, v, tt, frames)
  return sharded_over_frames(fn, mesh, q, k, v, jnp.full((q.shape[0],), t, jnp.float32))


def _official_attention_rank(q, k, v, r, world, f, p, top_k, t, phase_t=800.0, bias=10.0):
  """AttentionPlugin on rank r (method notes, section 2 pseudo-code)."""
  share = top_k // world
  stride = max(f // share, 1) if share > 0 else 10**6  # share 0: only local frame 0
  idx = np.arange(0, f, stride)
  kg = np.concatenate([k[:, :, rr * f + idx] for rr in range(world)], 2)[:, :, :top_k]
  vg = np.concatenate([v[:, :, rr * f + idx] for rr in range(world)], 2)[:, :, :top_k]
  zeros = np.zeros_like(k[:, :, :p])
  n = k.shape[2]

  def pad(a):
    left = a[:, :, r * f - p : r * f] if r > 0 else zeros
    right = a[:, :, (r + 1) * f : (r + 1) * f + p] if (r + 1) * f < n else zeros
    return np.concatenate([left, a[:, :, r * f : (r + 1) * f], right], 2)

  keys, vals = np.concatenate([pad(k), kg], 2), np.concatenate([pad(v), vg], 2)
  g = kg.shape[2]
  mask = np.ones((f, f + 2 * p + g))
  for i in range(f):
    mask[i, 0:i] = -np.inf
    mask[i, i + 2 * p + 1 : f + 2 * p] = -np.inf
  if t < phase_t:
    mask[:, : f + 2 * p] += bias
  else:
    mask[:, f + 2 * p :] += bias
  qr = q[:, :, r * f : (r + 1) * f]
  logits = np.einsum("bmqhd,bmkhd->bmhqk", qr, keys) / np.sqrt(q.shape[-1]) + mask
  pr = np.exp(logits - logits.max(-1, keepdims=True))
  pr /= pr.sum(-1, keepdims=True)
  return np.einsum("bmhqk,bmkhd->bmqhd", pr, vals)


@pytest.mark.parametrize("t", [900.0, 300.0])
def test_official_attention_semantics_on_two_devices(t):
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((1, 3, 32, 2, 8), dtype=np.float32) for _ in range(3))
  want = np.concatenate([_official_attention_rank(q, k, v, r, 2, 16, 8, 16, t) for r in range(2)], 2)
  cfg = TemporalConfig(attention="dual", window=8, num_global=16, group_norm="local", video_ends="zeros")
  mesh = parallel.make_mesh(2)
  frames = parallel.frame_context(mesh, cfg)
  got = _sharded_dual_scope(mesh, frames, t, q, k, v)
  assert rel_err(got, want) <= RTOL


def _official_global_indices(f, world, top_k):
  """The official get_topk on every rank (method notes, section 2): local indices arange(0, F, stride),
  stride = max(F // (top_k // W), 1) (share 0: only frame 0), ranks concatenated in order, cut to top_k."""
  share = top_k // world
  stride = max(f // share, 1) if share > 0 else 10**6
  idx = np.arange(0, f, stride)
  return [int(r * f + i) for r in range(world) for i in idx][:top_k]


def test_official_global_positions_restated():
  for f in (1, 3, 4, 8, 10, 24, 25, 288):
    for world in range(1, 18):
      for top_k in (1, 3, 8, 16, 24):
        got = parallel.global_positions(world * f, top_k, world, "official")
        assert list(got) == _official_global_indices(f, world, top_k), (f, world, top_k)
  # the notes' numbers for F=24, top_k=16
  assert parallel.global_positions(24, 16, 1, "official") == tuple(range(16))
  assert parallel.global_positions(48, 16, 2, "official") == tuple(range(0, 48, 3))
  assert len(parallel.global_positions(120, 16, 5, "official")) == 15
  assert parallel.global_positions(192, 16, 8, "official")[:4] == (0, 12, 24, 36)
  assert parallel.global_positions(17 * 24, 16, 17, "official") == tuple(range(0, 16 * 24, 24))
  # the default is unchanged: k * N / G whatever the device count
  assert parallel.global_positions(48, 16, 3) == tuple(range(0, 48, 3))


def test_official_global_frames_frame_checks():
  official = TemporalConfig(attention="dual", window=8, num_global=16, global_frames="official")
  parallel.check_frames(24, 1, official)  # the official single-GPU example
  parallel.check_frames(30, 3, dataclasses.replace(official, window=4, num_global=8))
  with pytest.raises(ValueError, match="not divisible by num_global G=16 .global_frames=video"):
    parallel.check_frames(24, 1, dataclasses.replace(official, global_frames="video"))
  with pytest.raises(ValueError, match="global_frames='all', expected 'video' or 'official'"):
    dataclasses.replace(official, global_frames="all").validate()


@pytest.mark.parametrize("f, p, top_k, t", [(8, 4, 16, 900.0), (8, 4, 16, 300.0), (10, 3, 8, 900.0), (6, 2, 2, 900.0)])
def test_official_attention_semantics_on_three_devices(f, p, top_k, t):
  """global_frames=official on 3 devices, where 3 does not divide G: each rank's own evenly spaced frames
  (8 frames, G=16: all 24 frames cut to 16; 10 frames, G=8: 2 per rank, 6 in all; G=2 < 3: frame 0 of
  ranks 0 and 1), against the official plugin restated rank by rank."""
  rng = np.random.default_rng(f * 100 + top_k)
  n = 3 * f
  q, k, v = (rng.standard_normal((1, 3, n, 2, 8), dtype=np.float32) for _ in range(3))
  want = np.concatenate([_official_attention_rank(q, k, v, r, 3, f, p, top_k, t) for r in range(3)], 2)
  cfg = TemporalConfig(
    attention="dual", window=p, num_global=top_k, group_norm="local", video_ends="zeros", global_frames="official"
  )
  mesh = parallel.make_mesh(3)
  frames = parallel.frame_context(mesh, cfg)
  assert list(frames.global_positions(n)) == _official_global_indices(f, 3, top_k)
  got = _sharded_dual_scope(mesh, frames, t, q, k, v)
  assert rel_err(got, want) <= RTOL
  if top_k == 16:  # and the video rule (k*N/G) differs from it here
    video = parallel.frame_context(mesh, dataclasses.replace(cfg, global_frames="video", num_global=8))
    assert video.global_positions(n) != frames.global_positions(n)


def test_multi_host_equals_one_process(tmp_path):
  """2 local processes x 4 CPU devices (jax.distributed on localhost, gloo) == 1 process x 8 devices."""
  import socket
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

  def worker(nproc, pid, port, local, out):
    cmd = [sys.executable, "-m", "tests._multihost_worker", str(nproc), str(pid), str(port), str(local), str(out)]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [worker(2, i, port, 4, tmp_path / "multi.npy") for i in range(2)]
  # the reference: this process's 8 devices, while the two workers run (what tests._multihost_worker runs)
  temporal = TemporalConfig(attention="dual", window=4, num_global=8)
  one = run_video(tame(unet3d.build(TINY.unet, seed=0)), "dpmpp_sde", None, temporal)
  for p in procs:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
  multi = np.load(tmp_path / "multi.npy")
  assert multi.shape == one.shape == (1, 32, 8, 8, 4)
  assert rel_err(multi, one) <= RTOL
