"""The decoded video as it reaches the host: the VAE decode in pieces, each handed on (to the mp4 writer)
while the next one decodes on the devices.

One compiled program decodes the ``piece`` frames from ``start`` of each device's share
(:func:`vinf_jax.pipeline.programs.make_decoder`); :meth:`Decoded.pieces` runs it for each start, the next
piece dispatched as soon as the last one is done (so one piece's temporaries live at a time) and before the
last one is copied to the host, and yields the video's frames in order as they become whole: with one device
every piece, with several device 0's pieces and then the rest at the end. With several processes every
copy is a collective, so the whole video is gathered first (:meth:`Decoded.all`).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from vinf_jax import parallel
from vinf_jax.pipeline import programs


class Decoded:
  """The frames of the final latents ``x`` as the compiled piece decoder ``fn`` makes them.

  Attributes:
    frames: uint8 ``[N, H, W, 3]`` once every piece is on the host (after :meth:`pieces` ran out, or
      :meth:`all`), else None.
    started, done_at: ``time.perf_counter()`` when the decode began, and when its last piece was on the host.
  """

  def __init__(self, fn, params, x: jax.Array, piece: int, mesh: jax.sharding.Mesh, frame_shape: tuple):
    self._fn, self._params, self._x, self._piece, self._mesh = fn, params, x, piece, mesh
    self._shape = (x.shape[1], *frame_shape)  # [N, H, W, 3]
    self.frames: np.ndarray | None = None
    self.started = time.perf_counter()
    self.done_at: float | None = None
    self._next = self._launch(0) if self._starts else None  # the devices start on the first piece now

  @property
  def _local(self) -> int:
    return self._x.shape[1] // self._mesh.size

  @property
  def _starts(self) -> list[int]:
    return programs.piece_starts(self._local, self._piece)

  @property
  def shape(self) -> tuple:
    return self._shape

  def _launch(self, k: int) -> jax.Array:
    start = parallel.replicate(np.int32(self._starts[k]), self._mesh)
    return self._fn(self._params, self._x, start)

  def pieces(self):
    """The video's frames in order, uint8 ``[t, H, W, 3]`` arrays, as they reach the host."""
    if self.frames is not None:
      yield self.frames
      return
    out = np.empty(self._shape, np.uint8)
    starts, t, p, d = self._starts, self._local, self._piece, self._mesh.size
    given = 0
    for k, s in enumerate(starts):
      cur, self._next = self._next, None
      cur.block_until_ready()
      if k + 1 < len(starts):
        self._next = self._launch(k + 1)  # decodes while this piece is copied and written
      host = parallel.gather_to_host(cur)[0]  # [D * p, H, W, 3]
      del cur
      for dev in range(d):
        out[dev * t + s : dev * t + s + p] = host[dev * p : (dev + 1) * p]
      ready = s + p if k + 1 < len(starts) else len(out)  # device 0's frames are the video's first
      if ready > given:
        yield out[given:ready]
        given = ready
    self.frames, self.done_at = out, time.perf_counter()

  def all(self) -> np.ndarray:
    """Every frame (decoding what is left)."""
    for _ in self.pieces():
      pass
    return self.frames
