"""Stopping a run on SIGTERM or SIGINT (Slurm, ``timeout``, ``docker stop``, pre-emption, Ctrl-C) with what it has.

Inside :func:`handled` (the command line runs :func:`vinf_jax.pipeline.generate` there) the first SIGTERM or
SIGINT asks the run to stop; :func:`generate` then raises :class:`Interrupted` instead of going on:

* while loading, encoding or compiling (nothing sampled yet, nothing to save): at once, through
  :class:`Stop` raised by the handler inside :func:`at_once` blocks;
* while sampling: after the current step, with that state saved where a resume finds it;
* while decoding or writing: at once, with the final state saved and the partial files removed.

A second signal ends the process at once with status 128 + signal (a thread sees it even while the main
thread waits in a compile or a step; Python runs its handlers only between bytecodes). With several
processes every process gets the signal itself (Slurm sends it to every task) and they stop together: each
asks the others at the same points (before each step, before decoding, before writing), so a stop is never
seen by only some of them in the middle of a collective; the stages between those points run to their end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RuntimeError):
  """:func:`generate` stopped on a signal; the one-line message says when and where the state was saved.

  Attributes:
    signum: the signal; exit_code: the command's exit status for it (128 + signal: 143 SIGTERM, 130 SIGINT).
    state_dir: the state directory that ``resume`` continues from, or None (nothing sampled: start again).
  """

  def __init__(self, message: str, signum: int, state_dir: str | None = None):
    super().__init__(message)
    self.signum, self.state_dir = signum, state_dir

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class Stop(BaseException):  # noqa: N818 -- not an error: no ``except Exception`` on the way may swallow it
  """Raised by the signal handler inside an :func:`at_once` block (the run's stage turns it into Interrupted)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


_received: list[int] = []  # the signals the handler has seen, in order
_depth = [0]  # at_once blocks entered
_installed = [False]


def name(signum: int) -> str:
  return signal.Signals(signum).name


def _handler(signum, frame) -> None:
  del frame
  _received.append(signum)
  if len(_received) == 1 and _depth[0]:
    raise Stop(signum)


def _watch(fd: int, announce: bool) -> None:
  """The first signal's notice and the second one's exit, as soon as they come (whatever the main thread does)."""
  seen = 0
  with contextlib.suppress(OSError):
    while data := os.read(fd, 64):
      for signum in (s for s in data if s in SIGNALS):
        seen += 1
        if seen == 1 and announce:
          print(f"{name(signum)}: stopping after what runs now (again to stop at once)", file=sys.stderr, flush=True)
        elif seen > 1:
          print(f"{name(signum)} again: stopping at once", file=sys.stderr, flush=True)
          os._exit(128 + signum)
  os.close(fd)


@contextlib.contextmanager
def handled() -> Iterator[None]:
  """SIGTERM and SIGINT handled as the module docstring says inside the block (the main thread only; elsewhere
  the block runs without); the handlers before it are back afterwards."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  r, w = os.pipe()
  os.set_blocking(w, False)
  old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
  old = {s: signal.signal(s, _handler) for s in SIGNALS}
  watcher = threading.Thread(target=_watch, args=(r, jax.process_index() == 0), daemon=True, name="vinf_jax-signals")
  watcher.start()
  _received.clear()
  _installed[0] = True
  try:
    yield
  finally:
    _installed[0] = False
    for s, h in old.items():
      signal.signal(s, h)
    signal.set_wakeup_fd(old_fd)
    os.close(w)  # the watcher's read ends
    watcher.join(timeout=5)
    _received.clear()


@contextlib.contextmanager
def at_once() -> Iterator[None]:
  """A first signal inside the block raises :class:`Stop` where the main thread is (at once, or when a compile
  or a computation it waits for returns); one that came before raises on entry. With several processes the
  block runs to its end (they stop together at :func:`requested`)."""
  if not _installed[0] or jax.process_count() > 1:
    yield
    return
  if _received:
    raise Stop(_received[0])
  _depth[0] += 1
  try:
    yield
  finally:
    _depth[0] -= 1


def pending() -> int:
  """The first signal this process got (0: none); no collective."""
  return _received[0] if _installed[0] and _received else 0


def requested() -> int:
  """The signal that asks the run to stop (0: none): with several processes the one any process got, so call
  it at the same point on every process (a collective there)."""
  if not _installed[0]:
    return 0
  mine = pending()
  if jax.process_count() == 1:
    return mine
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(mine))))
