"""Float8 (e4m3) linear layers for Hopper GPUs: per-tensor scales, float32 accumulation (``precision='fp8'``).

Scheme (per matmul ``y = x W + b``, x ``[..., K]``, W ``[K, N]``):

- the weight gets one scale ``s_w = max|W| / 448`` (448: e4m3fn's largest finite value), computed once when the
  model is prepared (:class:`Fp8Linear`, built by ``unet3d.with_precision`` at load time), and is held as
  ``round_e4m3(W / s_w)`` transposed to ``[N, K]``: cuBLASLt's fp8 GEMM takes both operands K-major ("TN"), so
  stored that way no transpose of the weight runs at each step;
- the activation gets its scale ``s_x = max|x| / 448`` at each call: its range moves with the timestep, the
  guidance branch and the layer, a static calibration would need the real weights and data, and a delayed
  (amax-history) scale would need state carried between steps. The amax is over the array the layer sees: the
  local frames of a device, or one chunk of ``frame_chunk``; so an fp8 video depends, at fp8 rounding level, on
  the device count and the chunking (the default precision does not);
- the product is ``dot_general(x_q, W_q, preferred_element_type=float32) * (s_x * s_w)``: XLA's GPU GEMM
  rewriter turns a dot of two f8e4m3fn operands with an f32 result followed by a multiply with a scalar into
  one cuBLASLt fp8 GEMM (custom call ``__cublas$lt$matmul$f8``, the scales as its A/B scale operands,
  accumulation in float32; shapes that are no multiple of 16 are padded by the rewriter; see XLA's
  ``gemm_rewriter_fp8_test.cc``, ``ScaledABUnscaledD*``), on Ada/Hopper and newer; elsewhere XLA converts the
  operands up and runs an ordinary dot. The result is cast to the compute dtype, then the bias is added (as
  ``nnx.Linear`` does).

On CPU (the tests) XLA converts the e4m3 operands to float32 and runs a float32 dot: a product of two e4m3 values
is exact in float32, so the CPU computes the same quantised function as the GPU up to the summation order.

Convolutions stay in the compute dtype. XLA has an fp8 path for them too (cuDNN graph convolutions built by its
``cudnn_fused_conv_rewriter`` from ``convert(f8) * scale`` operands; Hopper, cuDNN 8.9+), but it is not wired
here: whether cuDNN has fp8 engines for the UNet's shapes (3x3 NHWC convs of 320..1280 channels, the temporal
(3, 1) convs) is unmeasured, and where the rewrite does not match, the conv would run in the wide type behind
extra quantisation passes: slower than bf16. A measured follow-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448


def amax_scale(x: jax.Array) -> jax.Array:
  """float32 scalar ``max|x| / 448``, so that ``x / scale`` spans e4m3's range (floored above 0 for an all-zero x)."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  return jnp.maximum(amax / E4M3_MAX, jnp.finfo(jnp.float32).tiny)  # floored after the division: no 0 / 0


def quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``x / scale`` rounded to e4m3 (nearest even), saturated at +-448: e4m3fn has no infinity, so a value that
  rounded above 448 would become NaN. The clamp with e4m3's own limits is the saturating cast XLA matches."""
  y = x.astype(jnp.float32) / scale
  return jnp.clip(y, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def fp8_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, out_dtype) -> jax.Array:
  """``x @ (w_q * w_scale).T`` with x quantised per tensor: x ``[..., K]``, w_q ``[N, K]`` e4m3 -> ``[..., N]``."""
  k = x.shape[-1]
  x_scale = amax_scale(x)
  x_q = quantize(x, x_scale).reshape(-1, k)  # [M, K]
  y = jax.lax.dot_general(x_q, w_q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [M, N]
  y = y * (x_scale * w_scale)
  return y.astype(out_dtype).reshape(*x.shape[:-1], w_q.shape[0])


class Fp8Linear(nnx.Module):
  """An ``nnx.Linear`` quantised to e4m3: ``kernel_t`` ``[out, in]`` e4m3, ``kernel_scale`` float32 ``[]``, ``bias``.

  Built from a Linear's weights (:meth:`from_linear`); the scale is computed here, once.
  """

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, *, dtype):
    w = jnp.asarray(kernel).astype(jnp.float32)  # [in, out]
    scale = amax_scale(w)
    self.in_features, self.out_features = w.shape
    self.kernel_t = nnx.Param(quantize(w.T, scale))  # [out, in]
    self.kernel_scale = nnx.Param(scale)
    self.bias = nnx.Param(bias) if bias is not None else None
    self.dtype = dtype

  @classmethod
  def from_linear(cls, linear: nnx.Linear) -> Fp8Linear:
    bias = linear.bias[...] if linear.bias is not None else None
    return cls(linear.kernel[...], bias, dtype=linear.dtype or linear.kernel[...].dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in] -> [..., out] in the layer's dtype."""
    y = fp8_matmul(x, self.kernel_t[...], self.kernel_scale[...], out_dtype=self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def quantize_linears(model: nnx.Module, owners: tuple[type, ...]) -> int:
  """Replace, in place, each ``nnx.Linear`` attribute of every module of ``model`` that is one of ``owners`` by
  its :class:`Fp8Linear`; returns how many were replaced."""
  targets = [
    (m, name, v)
    for _, m in nnx.iter_modules(model)
    if isinstance(m, owners)
    for name, v in vars(m).items()
    if isinstance(v, nnx.Linear)
  ]
  for m, name, linear in targets:
    setattr(m, name, Fp8Linear.from_linear(linear))
  return len(targets)
