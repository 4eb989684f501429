"""Writing videos (mp4, gif, a directory of PNG frames) and their JSON sidecar, atomically.

Every writer renders into a temporary name beside the target and renames it into place only when it
is complete, so a failed or interrupted run never leaves a half-written file where a video should be.
The temporary name keeps the suffix, because imageio picks the container from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".gif")


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


def check_writable(path: str, what: str = "output", *, directory: bool = False) -> None:
  """Raise ValueError unless ``path`` can be created: its nearest existing ancestor is a writable directory.

  Missing parent directories are fine (they are created when the file is written); a path that exists
  as the wrong kind (a directory where a file goes, or a non-empty directory for PNG frames) is not.
  """
  kind = "png" if directory else "file"
  path = os.path.abspath(path)
  if os.path.isdir(path) and kind != "png":
    raise ValueError(f"{what}={path!r} is an existing directory; expected a file path")
  if kind == "png" and os.path.isdir(path) and os.listdir(path):
    raise ValueError(f"{what}={path!r} is a non-empty directory; PNG frames go into a new or empty directory")
  if kind == "png" and os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{what}={path!r} exists and is a file; PNG frames go into a directory")
  if os.path.exists(path) and not os.path.isdir(path) and not os.access(path, os.W_OK):
    raise ValueError(f"{what}={path!r} exists and is not writable")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{what}={path!r}: {parent!r} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{what}={path!r}: the directory {parent!r} is not writable")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` if the body succeeds."""
  path = os.path.abspath(path.rstrip("/"))
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  stem, suffix = os.path.splitext(name)
  fd, tmp = tempfile.mkstemp(prefix=f".{stem}.partial-", suffix=suffix, dir=parent)
  os.close(fd)
  os.unlink(tmp)  # the writer creates it (a file or a directory)
  try:
    yield tmp
    if os.path.isdir(tmp) and os.path.isdir(path):
      os.rmdir(path)  # an empty directory (check_writable refused a non-empty one)
    os.replace(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
      os.unlink(tmp)


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """Frames in [-1, 1] (any float dtype) -> uint8 in [0, 255], clipped and rounded."""
  return np.round((np.clip(np.asarray(frames, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, fps: float = 8.0) -> str:
  """Write ``frames`` (uint8 ``[T, H, W, 3]``) to ``path`` as mp4, gif or PNG frames; returns the path.

  mp4 uses imageio's ffmpeg plugin (H.264, yuv420p: H and W are even for every supported size); gif uses
  Pillow through imageio with ``1000 / fps`` ms per frame; a directory gets ``frame_00000.png``, ...
  """
  import imageio.v2 as imageio

  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
  if not fps > 0:
    raise ValueError(f"export fps={fps}, expected > 0")
  kind = output_kind(path)
  with atomic_path(path) as tmp, _quiet_fork():
    if kind == "mp4":
      # macro_block_size 1: keep the exact size (imageio would otherwise resize to multiples of 16).
      # quality 8 is x264's crf 10; preset veryfast encodes ~3x faster than x264's default (medium) at
      # about the same size here (200 noise-like 320x512 frames: 1.7 s and 28.5 MB against 4.9 s and
      # 29.5 MB on 2 CPU cores); a 1,152-frame video took 12 s to encode with medium on the GPU host.
      with imageio.get_writer(
        tmp,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        quality=8,
        macro_block_size=1,
        output_params=["-preset", "veryfast"],
      ) as w:
        for f in frames:
          w.append_data(f)
    elif kind == "gif":
      imageio.mimwrite(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
    else:
      os.makedirs(tmp)
      width = max(5, len(str(len(frames) - 1)))
      for i, f in enumerate(frames):
        imageio.imwrite(os.path.join(tmp, f"frame_{i:0{width}d}.png"), f)
  return os.path.abspath(path.rstrip("/"))


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


def write_json(path: str, obj) -> None:
  """Write ``obj`` as indented JSON, atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=False, default=_jsonable)
      f.write("\n")


def write_npy(path: str, array: np.ndarray) -> None:
  """``np.save`` to exactly ``path`` (which must end in .npy), atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(array))


def _jsonable(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, tuple | set):
    return list(x)
  return str(x)
