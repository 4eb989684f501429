"""Writing videos (mp4, gif, a directory of PNG frames) and their JSON sidecar, atomically.

Every writer renders into a temporary name beside the target (``.NAME.partial-HOST-PID-XXXXXXXX.SUFFIX``;
the suffix is kept because imageio picks the container from it) and renames it into place only when it is
complete and checked (an mp4 must be a whole MP4 file: ffmpeg reports a full disk but exits quietly), so a
failed or interrupted run never leaves a half-written file where a video should be and never replaces a
good one. :class:`AtomicFiles` does this for several files at once (a video, its sidecar, the latents):
all are renamed into place, or none. A write that fails raises :class:`WriteError` (one line: the path
and the reason) after removing its partial files; partial files that a killed run left behind are
removed by the next write of the same path when their process is gone. :func:`lock_paths` keeps two
runs from writing the same outputs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import struct
import tempfile
import time
import warnings
from collections.abc import Iterator

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".gif")
STALE_AFTER_S = 24 * 3600  # a partial file of another host (or an unknown writer) untouched this long is dead


class WriteError(RuntimeError):
  """Writing an output failed; nothing was renamed into place and the partial files were removed."""


class BusyError(ValueError):
  """Another run holds the lock of an output path."""


def output_kind(path: str) -> str:
  """'mp4', 'gif' or 'png' (a directory of frames: a path without a suffix or ending in '/')."""
  suffix = os.path.splitext(path.rstrip("/"))[1].lower()
  if path.endswith("/") or suffix == "":
    return "png"
  if suffix in VIDEO_SUFFIXES:
    return suffix[1:]
  raise ValueError(
    f"output={path!r}: unknown format {suffix!r}; expected a path ending in .mp4 or .gif, or a directory "
    "(no suffix) for PNG frames"
  )


def sidecar_path(path: str) -> str:
  """Where the JSON sidecar of ``path`` goes: ``video.mp4`` -> ``video.json``, ``frames/`` -> ``frames.json``."""
  base = path.rstrip("/")
  root, suffix = os.path.splitext(base)
  return (root if suffix.lower() in VIDEO_SUFFIXES else base) + ".json"


def check_writable(path: str, what: str = "output", *, directory: bool = False, reuse: bool = False) -> None:
  """Raise ValueError unless ``path`` can be written, found by trying: the missing parent directories and
  a temporary file in the parent (and inside ``path`` when it is an existing directory) are created, then
  removed again. So a read-only or full file system, a path under ``/proc`` (writable by permission bits
  as root) or a file where a directory should be is refused before any work, naming ``what``.

  A path that exists as the wrong kind (a directory where a file goes, or a non-empty directory for PNG
  frames) is refused too. ``reuse``: a directory written into (state, a cache): it may exist and hold files.
  """
  kind = "dir" if reuse else "png" if directory else "file"
  directory = directory or reuse
  path = os.path.abspath(path)
  if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{what}={path!r} exists and is not a directory")
  if os.path.isdir(path) and kind == "file":
    raise ValueError(f"{what}={path!r} is an existing directory; expected a file path")
  if kind == "png" and os.path.isdir(path) and os.listdir(path):
    raise ValueError(f"{what}={path!r} is a non-empty directory; PNG frames go into a new or empty directory")
  if kind == "png" and os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{what}={path!r} exists and is a file; PNG frames go into a directory")
  if os.path.exists(path) and not os.path.isdir(path) and not os.access(path, os.W_OK):
    raise ValueError(f"{what}={path!r} exists and is not writable")
  parent = os.path.dirname(path)
  existing = parent
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{what}={path!r}: {existing!r} is not a directory")
  probes = [parent] + ([path] if directory and os.path.isdir(path) else [])
  created, where = [], parent
  try:
    created = make_dirs(parent)
    for where in probes:
      fd, probe = tempfile.mkstemp(prefix=".vinf_jax-probe-", dir=where)
      os.close(fd)
      os.unlink(probe)
  except OSError as err:
    if err.filename and not os.path.basename(err.filename).startswith(".vinf_jax-probe-"):
      where = err.filename  # a directory make_dirs could not make
    raise ValueError(f"{what}={path!r}: cannot write in {where!r}: {err.strerror or err}") from None
  finally:
    remove_dirs(created)


def make_dirs(path: str) -> list[str]:
  """``os.makedirs(path, exist_ok=True)``; returns the directories it created, deepest last."""
  missing = []
  d = os.path.abspath(path)
  while not os.path.isdir(d):
    missing.append(d)
    d = os.path.dirname(d)
  for d in reversed(missing):
    try:
      os.mkdir(d)
    except FileExistsError:
      if not os.path.isdir(d):
        raise
      missing.remove(d)  # made meanwhile by another process: not ours to remove
  return list(reversed(missing))


def remove_dirs(created: list[str]) -> None:
  """Remove directories :func:`make_dirs` created, deepest first, as long as they are empty."""
  for d in reversed(created):
    try:
      os.rmdir(d)
    except OSError:
      return


# ------------------------------------------------------------------------------------------------
# Partial files, renamed into place when complete


def _partial_prefix(path: str) -> tuple[str, str, str]:
  """(parent, ``.STEM.partial-``, suffix) of ``path``'s partial files."""
  parent, name = os.path.split(os.path.abspath(path.rstrip("/")))
  stem, suffix = os.path.splitext(name)
  return parent, f".{stem}.partial-", suffix


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def clean_stale_partials(path: str, *, now: float | None = None) -> list[str]:
  """Remove the partial files of ``path`` left by runs that are gone; returns what was removed.

  Only names of this module's pattern for this exact target are considered: one of this host whose
  process no longer runs, or any (another host's, an older version's) untouched for a day.
  """
  parent, prefix, suffix = _partial_prefix(path)
  if not os.path.isdir(parent):
    return []
  now = time.time() if now is None else now
  host, removed = socket.gethostname(), []
  for name in os.listdir(parent):
    if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
      continue
    full = os.path.join(parent, name)
    middle = name[len(prefix) : len(name) - len(suffix)]
    parts = middle.rsplit("-", 2)
    try:
      age = now - os.lstat(full).st_mtime
    except FileNotFoundError:
      continue
    mine = len(parts) == 3 and parts[0] == host and parts[1].isdigit()
    if (mine and int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1]))) or age > STALE_AFTER_S:
      try:
        shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.unlink(full)
        removed.append(full)
      except FileNotFoundError:
        pass
  return removed


def partial_path(path: str) -> str:
  """A new partial name beside ``path``: ``.STEM.partial-HOST-PID-XXXXXXXX.SUFFIX`` (not created)."""
  parent, prefix, suffix = _partial_prefix(path)
  return os.path.join(parent, f"{prefix}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


class AtomicFiles:
  """Several outputs written under partial names and renamed into place together, or none of them.

  ``with AtomicFiles() as files: tmp = files.add(path); <write tmp>``: on success every partial is
  synced and renamed onto its path; on any error every partial
  (and every directory made for them) is removed, the paths keep what they held, and the error is
  raised as :class:`WriteError` naming the path being written.
  """

  def __init__(self, passthrough: tuple[type[BaseException], ...] = ()):
    """``passthrough``: errors raised as they are (the partials still removed): not the writes' (e.g. the
    device's, while the frames being written are still decoded)."""
    self._passthrough = passthrough
    self._items: list[tuple[str, str]] = []  # (path, partial)
    self._created: list[str] = []
    self._current: str | None = None

  def add(self, path: str) -> str:
    path = os.path.abspath(path.rstrip("/"))
    self._current = path
    self._created += make_dirs(os.path.dirname(path))
    clean_stale_partials(path)
    tmp = partial_path(path)
    self._items.append((path, tmp))
    return tmp

  def __enter__(self) -> AtomicFiles:
    return self

  def __exit__(self, exc_type, exc, tb):
    try:
      if exc is None:
        for path, tmp in self._items:
          self._current = path
          if not os.path.exists(tmp):
            raise OSError(errno.ENOENT, "the writer produced no file", tmp)
          if os.path.isfile(tmp):
            _fsync(tmp)
        for path, tmp in self._items:
          self._current = path
          if os.path.isdir(tmp) and os.path.isdir(path):
            os.rmdir(path)  # an empty directory (check_writable refused a non-empty one)
          os.replace(tmp, path)
        return False
    except Exception as err:
      exc = err
    finally:
      for _, tmp in self._items:
        try:
          if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
          elif os.path.lexists(tmp):
            os.unlink(tmp)
        except OSError:
          pass
      if exc is not None:
        remove_dirs(self._created)
    if isinstance(exc, Exception) and not isinstance(exc, (WriteError, *self._passthrough)):
      raise WriteError(f"could not write {self._current}: {one_line(exc)}") from exc
    return False


def one_line(err: BaseException, limit: int = 300) -> str:
  """An exception as one line of at most ``limit`` characters, for messages."""
  if isinstance(err, OSError) and err.strerror:
    return err.strerror
  text = str(err).strip().splitlines()
  line = f"{type(err).__name__}: {text[0].strip()}" if text else type(err).__name__
  return line if len(line) <= limit else line[: limit - 3] + "..."


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _why_not_writable(directory: str) -> str:
  """`` (REASON)`` when a file cannot be made in ``directory`` (read-only, full, gone), else ``""``."""
  try:
    fd, probe = tempfile.mkstemp(prefix=".vinf_jax-probe-", dir=directory)
    os.close(fd)
    os.unlink(probe)
  except OSError as err:
    return f" ({err.strerror or err})"
  return ""


def check_mp4(path: str) -> None:
  """Raise OSError unless ``path`` is a whole MP4 file: top-level boxes that end exactly at the end of
  the file, with the ``ftyp``, ``mdat`` and ``moov`` boxes (ffmpeg writes ``moov`` last, so a disk that
  filled up during the encode, where ffmpeg reports the error but imageio does not, shows here)."""
  size, pos, seen = os.path.getsize(path), 0, []
  with open(path, "rb") as f:
    while pos < size:
      f.seek(pos)
      head = f.read(16)
      if len(head) < 8:
        break
      n, kind = struct.unpack(">I4s", head[:8])
      if n == 1 and len(head) == 16:
        n = struct.unpack(">Q", head[8:16])[0]
      elif n == 0:
        n = size - pos
      if n < 8:
        break
      seen.append(kind)
      pos += n
  missing = [k.decode() for k in (b"ftyp", b"mdat", b"moov") if k not in seen]
  if pos != size or missing:
    raise OSError(
      errno.EIO,
      f"ffmpeg wrote an incomplete MP4 ({size} bytes; missing {missing or 'its end'}): is the disk full?",
      path,
    )


def check_gif(path: str) -> None:
  """Raise OSError unless ``path`` ends with a GIF trailer."""
  with open(path, "rb") as f:
    head = f.read(6)
    f.seek(max(0, os.path.getsize(path) - 1))
    tail = f.read(1)
  if head[:3] != b"GIF" or tail != b";":
    raise OSError(errno.EIO, "the GIF is incomplete", path)


# ------------------------------------------------------------------------------------------------
# Locks: one run per output


class PathLock:
  """An exclusive ``flock`` on ``.NAME.lock`` beside a path, held until :meth:`release` (or the process
  ends: the kernel drops the lock of a killed process, so a lock is never stale)."""

  def __init__(self, path: str, what: str):
    import fcntl

    path = os.path.abspath(path.rstrip("/"))
    parent, name = os.path.split(path)
    self.file = os.path.join(parent, f".{name}.lock")
    self._created = make_dirs(parent)
    while True:
      fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        remove_dirs(self._created)
        raise BusyError(
          f"{what}={path!r} is being written by another run ({holder}); wait for it to finish, or choose another {what}"
        ) from None
      # the holder before us may have removed the file after we opened it: lock the file that is there
      try:
        same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.unlink(self.file)  # while still holding it (see the inode check above)
    os.close(self._fd)
    self._fd = None
    remove_dirs(self._created)


@contextlib.contextmanager
def lock_paths(paths: dict[str, str]) -> Iterator[list[PathLock]]:
  """Hold a :class:`PathLock` on each ``{what: path}`` (empty paths skipped) for the body; raises
  :class:`BusyError` naming the first path another run holds. A path whose directory cannot be made
  is skipped (validation reports it)."""
  locks: list[PathLock] = []
  try:
    for what, path in paths.items():
      if not path:
        continue
      try:
        locks.append(PathLock(path, what))
      except OSError:
        continue
    yield locks
  finally:
    for lock in reversed(locks):
      lock.release()


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yield a partial path beside ``path`` (same suffix); rename it to ``path`` if the body succeeds
  (:class:`AtomicFiles` of one file)."""
  with AtomicFiles() as files:
    yield files.add(path)


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """Frames in [-1, 1] (any float dtype) -> uint8 in [0, 255], clipped and rounded."""
  return np.round((np.clip(np.asarray(frames, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def write_video(path: str, frames, fps: float = 8.0, *, files: AtomicFiles | None = None) -> str:
  """Write ``frames`` (uint8 ``[T, H, W, 3]``) to ``path`` as mp4, gif or PNG frames; returns the path.

  ``frames`` may also be an iterable of such arrays, the video's pieces in order (a decode that hands each
  piece over as it reaches the host): an mp4 encodes each piece while the next is made (:class:`Mp4Stream`).
  mp4 uses ffmpeg through imageio-ffmpeg (H.264, yuv420p: H and W are even for every supported size); gif
  uses Pillow through imageio with ``1000 / fps`` ms per frame; a directory gets ``frame_00000.png``, ...
  Atomic (see the module docstring); with ``files`` the video is one of the outputs of that
  :class:`AtomicFiles`, renamed into place when it completes. Raises :class:`WriteError` on failure.
  """
  if hasattr(frames, "__array__"):  # one array (numpy or jax), not an iterable of pieces
    frames = _check_frames(np.asarray(frames))
  if not fps > 0:
    raise ValueError(f"export fps={fps}, expected > 0")
  kind = output_kind(path)
  if files is None:
    with AtomicFiles() as own:
      return write_video(path, frames, fps, files=own)
  tmp = files.add(path)
  with _quiet_fork():
    render_video(tmp, frames, fps, kind)
  if kind in ("mp4", "gif"):  # ffmpeg reports a full disk but exits quietly: look at what it wrote
    if not os.path.exists(tmp):
      raise OSError(errno.EIO, f"the encoder wrote no file{_why_not_writable(os.path.dirname(tmp))}", tmp)
    (check_mp4 if kind == "mp4" else check_gif)(tmp)
  return os.path.abspath(path.rstrip("/"))


def _check_frames(frames: np.ndarray) -> np.ndarray:
  if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(
      f"frames must be uint8 [T, H, W, 3], got {getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}"
    )
  return frames


def render_video(tmp: str, frames, fps: float, kind: str) -> None:
  """The encoders of :func:`write_video`, writing straight to ``tmp`` (``frames``: an array or its pieces)."""
  import imageio.v2 as imageio

  pieces = [np.asarray(frames)] if hasattr(frames, "__array__") else frames
  if kind == "mp4":
    stream = None
    try:
      for piece in pieces:
        piece = _check_frames(piece)
        if stream is None:
          stream = Mp4Stream(tmp, piece.shape[1], piece.shape[2], fps)
        stream.add(piece)
      if stream is None:
        raise ValueError("no frames to write")
      stream.finish()
    except BaseException:
      if stream is not None:
        stream.abort()
      raise
    return
  frames = np.concatenate([_check_frames(p) for p in pieces])
  if kind == "gif":
    imageio.mimwrite(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
  else:
    os.makedirs(tmp)
    width = max(5, len(str(len(frames) - 1)))
    for i, f in enumerate(frames):
      imageio.imwrite(os.path.join(tmp, f"frame_{i:0{width}d}.png"), f)


class Mp4Stream:
  """An mp4 that ffmpeg encodes while its next frames are still being made: a thread feeds ffmpeg (through
  imageio-ffmpeg) with the pieces :meth:`add` queues, so the caller goes on (decoding the next piece) at once.

  H.264 in yuv420p; quality 8 is x264's crf 10; preset veryfast encodes ~3x faster than x264's default
  (medium) at about the same size here (200 noise-like 320x512 frames: 1.7 s and 28.5 MB against 4.9 s and
  29.5 MB on 2 CPU cores); macro_block_size 1 keeps the exact size (else resized to multiples of 16).
  :meth:`finish` waits for the encoder and raises its error; :meth:`abort` (on the caller's error) ends it.
  """

  def __init__(self, tmp: str, height: int, width: int, fps: float):
    import queue
    import threading

    import imageio_ffmpeg

    self._queue, self._error, self._stop = queue.SimpleQueue(), None, False
    self._gen = imageio_ffmpeg.write_frames(
      tmp,
      (width, height),
      fps=fps,
      codec="libx264",
      quality=8,
      macro_block_size=1,
      output_params=["-preset", "veryfast"],
    )
    with _quiet_fork():
      self._gen.send(None)  # ffmpeg starts
    self._thread = threading.Thread(target=self._feed, daemon=True, name="vinf_jax-mp4")
    self._thread.start()

  def _feed(self) -> None:
    while (piece := self._queue.get()) is not None:
      for f in piece:
        if self._error is not None or self._stop:
          break
        try:
          self._gen.send(np.ascontiguousarray(f))
        except BaseException as err:  # noqa: BLE001 -- raised in the caller's thread by finish()
          self._error = err

  def add(self, frames: np.ndarray) -> None:
    if self._error is not None:
      raise self._error
    self._queue.put(frames)

  def finish(self) -> None:
    self._queue.put(None)
    self._thread.join()
    try:
      self._gen.close()  # ffmpeg writes the rest and exits
    except Exception as err:
      self._error = self._error or err
    if self._error is not None:
      raise self._error

  def abort(self) -> None:
    self._stop = True
    self._queue.put(None)
    self._thread.join(timeout=60)
    with contextlib.suppress(Exception):
      self._gen.close()


def read_video(path: str) -> np.ndarray:
  """Read back what :func:`write_video` wrote: uint8 ``[T, H, W, 3]`` (tests and the notebook)."""
  import imageio.v2 as imageio

  kind = output_kind(path)
  if kind == "png":
    names = sorted(n for n in os.listdir(path) if n.endswith(".png"))
    return np.stack([imageio.imread(os.path.join(path, n)) for n in names])
  if kind == "gif":
    frames = np.asarray(imageio.mimread(path, format="GIF"))
    return frames[..., :3]
  with _quiet_fork(), imageio.get_reader(path, format="FFMPEG") as r:
    return np.stack([np.asarray(f) for f in r])


@contextlib.contextmanager
def _quiet_fork():
  # imageio-ffmpeg starts ffmpeg with subprocess; JAX warns about any fork in a process that uses it,
  # which is harmless here (the child only execs ffmpeg).
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*os\.fork\(\) was called.*", category=RuntimeWarning)
    yield


def write_json(path: str, obj, *, files: AtomicFiles | None = None) -> None:
  """Write ``obj`` as indented JSON, atomically (with ``files``: as one of its outputs)."""
  if files is None:
    with AtomicFiles() as own:
      return write_json(path, obj, files=own)
  with open(files.add(path), "w") as f:
    json.dump(obj, f, indent=1, sort_keys=False, default=_jsonable)
    f.write("\n")


def write_npy(path: str, array: np.ndarray, *, files: AtomicFiles | None = None) -> None:
  """``np.save`` to exactly ``path`` (which must end in .npy), atomically (with ``files``: as one of its outputs)."""
  if files is None:
    with AtomicFiles() as own:
      return write_npy(path, array, files=own)
  with open(files.add(path), "wb") as f:
    np.save(f, np.asarray(array))


def _jsonable(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, tuple | set):
    return list(x)
  return str(x)
