"""Faults and bad inputs a user meets (issue 16): failed writes keep the old files and save what was sampled,
damaged states fall back or are named, stale partial files are cleaned, two runs cannot write one output,
every late-checked flag is refused up front, and the official global-frame rule runs on one GPU.

In-process runs share one set of tiny random models; the command-line cases that are refused before
anything loads take ~3 s each.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tests.test_sample import BASE  # 16 frames at 64x64 on 4 devices, 3 steps
from vinf_jax import parallel, pipeline, sample, video_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the same settings as flags (a run of the command line resumes in process, and the other way round)
BASE_FLAGS = [
  "--model=tiny",
  "--prompt=a red panda eating bamboo",
  "--frames=16",
  "--height=64",
  "--width=64",
  "--steps=3",
  "--guidance=7.5",
  "--window=2",
  "--num_global=4",
  "--num_devices=4",
  "--decode_chunk=3",
]


def cfg(**kw) -> pipeline.GenerationConfig:
  return dataclasses.replace(BASE, **kw)


def quiet(msg):
  del msg


@pytest.fixture(scope="module")
def models():
  return pipeline.load_models(BASE)


@pytest.fixture(scope="module")
def full(models):
  """The uninterrupted run's latents."""
  return pipeline.generate(cfg(), models=models, log=quiet).latents


@pytest.fixture
def tmp_tempdir(tmp_path, monkeypatch):
  """tempfile.gettempdir() inside tmp_path (where a rescued state goes without a state_dir)."""
  d = tmp_path / "systmp"
  d.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(d))
  return d


def _cli(*args, cwd=ROOT, env=None, timeout=300):
  t = time.perf_counter()
  p = subprocess.run(
    [sys.executable, "-m", "vinf_jax.sample", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
  )
  return p, time.perf_counter() - t


def _partials(d) -> list[str]:
  return sorted(n for n in os.listdir(d) if ".partial-" in n or n.endswith(".lock"))


# ---------------------------------------------------------------------------------------------
# Writes that fail: the old files stay, the partial files go, the sampled latents are kept.


def _old_files(d) -> dict:
  old = {"v.mp4": b"an earlier good video", "v.json": b'{"earlier": true}\n', "l.npy": b"earlier latents"}
  for name, data in old.items():
    (d / name).write_bytes(data)
  return old


class _RenderTruncated:
  """What ffmpeg leaves on a full disk: the start of an MP4 without its moov box, and no error raised."""

  def __init__(self, real):
    self.real = real

  def __call__(self, tmp, frames, fps, kind):
    self.real(tmp + ".whole.mp4", frames, fps, kind)
    with open(tmp + ".whole.mp4", "rb") as f:
      head = f.read(2000)
    os.unlink(tmp + ".whole.mp4")
    with open(tmp, "wb") as f:
      f.write(head)


def _fail_after_some_bytes(real, stem):
  """A writer (json.dump(obj, f) or np.save(f, arr)) that, for one of our partial files (``.STEM.partial-*``),
  writes a little and then hits a full disk."""

  def fake(*args, **kwargs):
    f = next((a for a in args if hasattr(a, "write") and isinstance(getattr(a, "name", None), str)), None)
    if f is None or not os.path.basename(f.name).startswith(f".{stem}.partial-"):
      return real(*args, **kwargs)
    f.write(b"\x93NUMPY" if "b" in f.mode else "{")
    raise OSError(errno.ENOSPC, "No space left on device")

  return fake


@pytest.mark.parametrize("failing", ["video", "sidecar", "latents"])
def test_a_failed_write_keeps_the_old_files_and_the_sampled_state(models, full, tmp_path, tmp_tempdir, failing):
  out = tmp_path / "out"
  out.mkdir()
  old = _old_files(out)
  mp = pytest.MonkeyPatch()
  if failing == "video":
    mp.setattr(video_io, "render_video", _RenderTruncated(video_io.render_video))
  elif failing == "sidecar":
    mp.setattr(video_io.json, "dump", _fail_after_some_bytes(json.dump, "v"))
  else:
    mp.setattr(video_io.np, "save", _fail_after_some_bytes(np.save, "l"))
  c = cfg(output=str(out / "v.mp4"), save_latents=str(out / "l.npy"))
  try:
    with pytest.raises(video_io.WriteError) as e:
      pipeline.generate(c, models=models, log=quiet)
  finally:
    mp.undo()
  msg = str(e.value)
  print(msg)
  assert "\n" not in msg and "the files already there are unchanged" in msg
  assert {"video": "incomplete MP4", "sidecar": "No space left", "latents": "No space left"}[failing] in msg
  for name, data in old.items():  # every old file intact, whichever write failed
    assert (out / name).read_bytes() == data, name
  assert _partials(out) == [], "partial files or locks left behind"
  assert sorted(os.listdir(out)) == ["l.npy", "v.json", "v.mp4"]
  # the sampled latents were saved as a state in the system's temporary directory, as the message says
  (rescue,) = [tmp_tempdir / n for n in os.listdir(tmp_tempdir)]
  assert f"--resume={rescue} " in msg
  assert sorted(os.listdir(rescue)) == ["run.json", "step_00003"]
  if failing != "video":
    return
  # the same settings with --resume and a new output only decode and write: the uninterrupted video
  done = pipeline.generate(cfg(resume=str(rescue), output=str(out / "new.mp4")), models=models, log=quiet)
  assert done.steps_done == 3
  np.testing.assert_array_equal(done.latents, full)
  assert video_io.read_video(str(out / "new.mp4")).shape == (16, 64, 64, 3)


def test_the_command_exits_1_with_one_line_after_a_failed_write(models, tmp_path, tmp_tempdir, monkeypatch, capsys):
  """sample.main: exit status 1, one 'error:' line naming the file and where the state went, no traceback."""
  monkeypatch.setattr(pipeline.models, "load_models", lambda *a, **k: models)
  monkeypatch.setattr(video_io, "render_video", _RenderTruncated(video_io.render_video))
  (tmp_path / "v.mp4").write_bytes(b"old")
  sample.parse_flags(["sample", *BASE_FLAGS, f"--output={tmp_path / 'v.mp4'}"])
  with pytest.raises(SystemExit) as e:
    sample.main(["sample"])
  err = capsys.readouterr().err
  assert e.value.code == 1, err
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"error: could not write {tmp_path / 'v.mp4'}: ffmpeg wrote"), err
  assert "--resume=" in lines[0] and (tmp_path / "v.mp4").read_bytes() == b"old"
  assert _partials(tmp_path) == []


def _mount_tmpfs(path, size):
  path.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()}); the fake-writer tests cover this")


def test_full_disk_through_the_command_line(tmp_path):
  """A real full disk (a 1 MiB tmpfs) and the real ffmpeg: exit 1, one line, no traceback, the old video
  intact, no partial file, and the sampled state in TMPDIR as the message says."""
  small = tmp_path / "small"
  _mount_tmpfs(small, "1m")
  try:
    (small / "v.mp4").write_bytes(b"an earlier good video")
    with open(small / "fill", "wb") as f:  # leave ~40 kB: the probe passes, the 16-frame mp4 does not fit
      f.write(b"\0" * (1024 * 1024 - 40 * 1024 - 8192))
    env = dict(os.environ, TMPDIR=str(tmp_path / "systmp"))
    os.makedirs(env["TMPDIR"])
    flags = [*BASE_FLAGS, "--num_devices=1", "--steps=1"]
    p, _ = _cli(*flags, f"--output={small / 'v.mp4'}", env=env)
    print(p.stdout[-1500:], p.stderr[-3000:])
    assert p.returncode == 1, p.stderr
    ours = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]  # ffmpeg prints its own lines too
    assert len(ours) == 1 and "Traceback" not in p.stderr
    assert f"error: could not write {small / 'v.mp4'}: ffmpeg wrote an incomplete MP4" in ours[0], ours
    assert (small / "v.mp4").read_bytes() == b"an earlier good video"
    assert sorted(os.listdir(small)) == ["fill", "v.mp4"]
  finally:
    subprocess.run(["umount", str(small)], check=False)
  (rescue,) = [os.path.join(env["TMPDIR"], n) for n in os.listdir(env["TMPDIR"])]
  assert f"--resume={rescue} " in ours[0]
  assert sorted(os.listdir(rescue)) == ["run.json", "step_00001"]
  assert "checksums.json" in os.listdir(os.path.join(rescue, "step_00001"))


def test_full_state_dir_warns_in_one_line_per_save(tmp_path):
  """A --state_dir on a full disk (issue 25): each failed periodic save is one warning line, with the OS's
  words and no orbax traceback or TensorStore spec; the run goes on and writes its video."""
  small = tmp_path / "small"
  _mount_tmpfs(small, "256k")
  try:
    with open(small / "fill", "wb") as f:  # room for run.json, not for a state's arrays
      f.write(b"\0" * (256 * 1024 - 12 * 1024))
    flags = [*BASE_FLAGS, "--num_devices=1", "--steps=3", "--save_state_every=1"]
    p, _ = _cli(*flags, f"--state_dir={small / 'st'}", f"--output={tmp_path / 'v.mp4'}")
    print(p.stdout[-1500:], p.stderr[-3000:])
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    for step in (1, 2):
      want = f"warning: could not save the state of step {step} in state_dir='{small / 'st'}': No space left on device"
      assert want in out, out
    for noise in ("Traceback", "TensorStore", "orbax", "ERROR"):
      assert noise not in out, (noise, out)
    assert not [n for n in os.listdir(small) if n.startswith("step_")]  # no half-written state left
    if (small / "st").exists():
      assert not [n for n in os.listdir(small / "st") if n.startswith("step_")]
    assert (tmp_path / "v.mp4").stat().st_size > 0
  finally:
    subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize("kind", ["mp4", "gif", "json"])
def test_folder_turned_read_only_before_the_write(tmp_path, kind):
  """The output folder becomes read-only after validation (remounted): WriteError in one line, old file kept."""
  ro = tmp_path / "ro"
  _mount_tmpfs(ro, "4m")
  try:
    (ro / f"v.{kind}").write_bytes(b"old")
    video_io.check_writable(str(ro / f"v.{kind}"))  # fine now
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(video_io.WriteError, match=rf"could not write {ro}/v.{kind}: .*Read-only file system") as e:
      if kind == "json":
        video_io.write_json(str(ro / "v.json"), {"a": 1})
      else:
        video_io.write_video(str(ro / f"v.{kind}"), frames)
    assert "\n" not in str(e.value)
    assert os.listdir(ro) == [f"v.{kind}"] and (ro / f"v.{kind}").read_bytes() == b"old"
    with pytest.raises(ValueError, match=rf"output='{ro}/w.mp4': cannot write in '{ro}': Read-only file system"):
      video_io.check_writable(str(ro / "w.mp4"))
  finally:
    subprocess.run(["umount", str(ro)], check=False)


def test_mp4_and_gif_checks():
  frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
  with tempfile.TemporaryDirectory() as d:
    for kind in ("mp4", "gif"):
      path = os.path.join(d, f"a.{kind}")
      video_io.write_video(path, frames)
      check = video_io.check_mp4 if kind == "mp4" else video_io.check_gif
      check(path)  # whole: fine
      data = open(path, "rb").read()
      for cut in (len(data) // 2, len(data) - 1):
        with open(path, "wb") as f:
          f.write(data[:cut])
        with pytest.raises(OSError, match="incomplete"):
          check(path)


# ---------------------------------------------------------------------------------------------
# Partial files of killed runs, and one run per output.


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_stale_partial_files_are_cleaned_only_when_dead_and_ours(tmp_path):
  import socket

  host, day = socket.gethostname(), 24 * 3600
  names = {
    f".v.partial-{host}-{_dead_pid()}-0a1b2c3d.mp4": True,  # this host, the process is gone
    f".v.partial-{host}-{os.getppid()}-0a1b2c3d.mp4": False,  # this host, alive (pytest's parent)
    ".v.partial-otherhost-12-0a1b2c3d.mp4": False,  # another host, fresh: maybe being written
    ".v.partial-k3j_x9qz.mp4": False,  # an older version's name, fresh
    ".v.partial-old_name.mp4": True,  # an older version's name, two days old
    f".v.partial-{host}-{_dead_pid()}-0a1b2c3d.json": False,  # the sidecar's: another target
    ".w.partial-otherhost-12-0a1b2c3d.mp4": False,  # another video
    "notes.txt": False,
  }
  for n in names:
    (tmp_path / n).write_text("x")
  os.utime(tmp_path / ".v.partial-old_name.mp4", (time.time() - 2 * day,) * 2)
  partial_dir = f".v.partial-{host}-{_dead_pid()}-ffffffff.mp4"  # a directory (as PNG frames' partials are)
  (tmp_path / partial_dir).mkdir()
  (tmp_path / partial_dir / "frame_00000.png").write_text("x")
  removed = video_io.clean_stale_partials(str(tmp_path / "v.mp4"))
  want = sorted([n for n, gone in names.items() if gone] + [partial_dir])
  assert sorted(os.path.basename(p) for p in removed) == want
  assert sorted(os.listdir(tmp_path)) == sorted(n for n, gone in names.items() if not gone)
  # and the next write of v.mp4 cleans them itself
  dead = tmp_path / f".v.partial-{host}-{_dead_pid()}-0a1b2c3d.mp4"
  dead.write_text("x")
  video_io.write_video(str(tmp_path / "v.mp4"), np.zeros((2, 16, 16, 3), np.uint8))
  assert not dead.exists() and (tmp_path / "v.mp4").exists()
  assert sorted(os.listdir(tmp_path)) == sorted(["v.mp4"] + [n for n, gone in names.items() if not gone])


_HOLD = (
  "import sys, time\nfrom vinf_jax import video_io\nlock = video_io.PathLock(sys.argv[1], 'output')\n"
  "print('locked', flush=True)\ntime.sleep(120)\n"
)


def test_two_runs_cannot_write_one_output(tmp_path):
  out = tmp_path / "v.mp4"
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    busy = rf"output='{out}' is being written by another run \(pid {holder.pid} on"
    with pytest.raises(video_io.BusyError, match=busy):
      video_io.PathLock(str(out), "output")
    p, _ = _cli(*BASE_FLAGS, f"--output={out}")
    assert p.returncode == 2 and f"is being written by another run (pid {holder.pid} on" in p.stderr, p.stderr
    # refused before loading anything: shown by what it printed, not by a clock (CI runs 4 workers on 2 cores)
    assert "random weights" not in p.stdout and "compiled" not in p.stdout, p.stdout
  finally:
    os.killpg(holder.pid, signal.SIGKILL)  # a killed holder: the kernel drops its lock
    holder.wait()
  lock = video_io.PathLock(str(out), "output")
  assert os.path.exists(tmp_path / ".v.mp4.lock")
  lock.release()
  assert os.listdir(tmp_path) == [] and not out.exists()


# ---------------------------------------------------------------------------------------------
# Saved states: a checksum per array, the last two kept, a damaged one named or skipped.


@pytest.fixture(scope="module")
def states(models, tmp_path_factory):
  """A state directory with steps 1 and 2, and the two states' arrays as saved."""
  d = tmp_path_factory.mktemp("states") / "state"
  pipeline.generate(cfg(save_state_every=1, state_dir=str(d), stop_after=2), models=models, log=quiet)
  assert sorted(os.listdir(d)) == ["run.json", "step_00001", "step_00002"]
  mesh = parallel.make_mesh(4)
  saved = {}
  for step in (1, 2):
    assert "checksums.json" in os.listdir(d / f"step_{step:05d}")
    only = d.parent / f"only{step}"
    shutil.copytree(d, only)
    if step == 1:
      shutil.rmtree(only / "step_00002")
    st = pipeline.state.restore_state(str(only), mesh, (1, 16, 8, 8, 4), log=quiet)
    saved[step] = np.asarray(st.x), np.asarray(st.x0)
  return d, saved


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _restore(d, logs):
  st = pipeline.state.restore_state(str(d), parallel.make_mesh(4), (1, 16, 8, 8, 4), log=logs.append)
  return int(np.asarray(st.i)), np.asarray(st.x), np.asarray(st.x0)


def test_random_bit_flips_never_resume_silently_with_other_latents(states, tmp_path):
  """40 single-bit flips anywhere in the newest state: each either leaves its arrays as saved, or is found
  (checksum or unreadable) and the older state is used with a warning; never other latents."""
  d, saved = states
  files = sorted(os.path.join(r, n) for r, _, ns in os.walk(d / "step_00002") for n in ns)
  rng = np.random.default_rng(0)
  caught = 0
  for k in range(40):
    copy = _copy(d, tmp_path / f"c{k}")
    victim = os.path.join(copy, os.path.relpath(files[rng.integers(len(files))], d))
    data = bytearray(open(victim, "rb").read())
    if not data:
      continue
    pos = int(rng.integers(len(data)))
    data[pos] ^= 1 << int(rng.integers(8))
    open(victim, "wb").write(bytes(data))
    logs = []
    step, x, x0 = _restore(copy, logs)
    if step == 2:
      assert not logs, logs
      np.testing.assert_array_equal(x, saved[2][0])
      np.testing.assert_array_equal(x0, saved[2][1])
    else:
      caught += 1
      assert step == 1 and len(logs) == 1 and "step 2 (step_00002)" in logs[0], (victim, logs)
      assert "resuming from step 1 instead" in logs[0]
      np.testing.assert_array_equal(x, saved[1][0])
    shutil.rmtree(copy)
  print(f"{caught} of 40 flips found, the rest left the arrays intact")
  assert caught >= 10  # most bytes of a checkpoint are its arrays


def _largest_file(d):
  files = [os.path.join(r, n) for r, _, ns in os.walk(d) for n in ns]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize(
  "damage,reason",
  [
    ("truncate_data", "cannot be read|checksum"),
    ("empty_data", "cannot be read|checksum"),
    ("truncate_metadata", "cannot be read"),
    ("no_checksums", "no checksums.json"),
    ("flip_checksum", "checksum of 'x' does not match"),
  ],
)
def test_damaged_state_falls_back_to_the_older_one(models, full, states, tmp_path, damage, reason):
  d, saved = states
  copy = _copy(d, tmp_path / "state")
  newest = copy / "step_00002"
  if damage in ("truncate_data", "empty_data"):
    victim = _largest_file(newest)
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2] if damage == "truncate_data" else b"")
  elif damage == "truncate_metadata":
    data = (newest / "_METADATA").read_bytes()
    (newest / "_METADATA").write_bytes(data[: len(data) // 2])
  elif damage == "no_checksums":
    (newest / "checksums.json").unlink()
  else:
    sums = json.loads((newest / "checksums.json").read_text())
    h = sums["arrays"]["x"]["sha256"]
    sums["arrays"]["x"]["sha256"] = ("0" if h[0] != "0" else "1") + h[1:]
    (newest / "checksums.json").write_text(json.dumps(sums))
  logs = []
  r = pipeline.generate(cfg(resume=str(copy)), models=models, log=logs.append)
  (warning,) = [ln for ln in logs if ln.startswith("warning:")]
  import re

  assert f"resume='{copy}': step 2 (step_00002): " in warning and re.search(reason, warning), warning
  assert "resuming from step 1 instead" in warning and any("at step 1/3" in ln for ln in logs)
  np.testing.assert_array_equal(r.latents, full)  # the older state, two more steps: the same video
  # both damaged: refused, naming the directory, each step and what is wrong
  (copy / "step_00001" / "checksums.json").unlink()
  with pytest.raises(ValueError, match=rf"resume='{copy}' holds no usable state: step 2 \(step_00002\): .*; "):
    pipeline.generate(cfg(resume=str(copy)), models=models, log=quiet)


def test_a_save_keeps_itself_and_the_state_before_it(states, tmp_path):
  """After a resume from the older state, the next save drops the newer (damaged) one, keeps its predecessor."""
  d, saved = states
  copy = _copy(d, tmp_path / "state")
  shutil.copytree(copy / "step_00002", copy / "step_00003")  # a newer state, as a damaged one left behind
  st = pipeline.state.restore_state(str(d), parallel.make_mesh(4), (1, 16, 8, 8, 4), log=quiet)  # step 2
  pipeline.state.save_state(str(copy), st, cfg())
  assert sorted(os.listdir(copy)) == ["run.json", "step_00001", "step_00002"]
  logs = []
  assert _restore(copy, logs)[0] == 2 and not logs


def test_damaged_state_and_run_json_through_the_command_line(states, tmp_path):
  d, _ = states
  copy = _copy(d, tmp_path / "state")
  for step in (1, 2):
    (copy / f"step_{step:05d}" / "checksums.json").unlink()
  p, _ = _cli(*BASE_FLAGS, f"--resume={copy}", f"--output={tmp_path / 'v.mp4'}")
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert f"resume='{copy}' holds no usable state: step 2 (step_00002): no checksums.json" in p.stderr
  assert "step 1 (step_00001): no checksums.json" in p.stderr and "random weights" not in p.stdout
  # truncated arrays in both (issue 25: TensorStore's multi-line spec was printed): one line, no spec
  bad = _copy(d, tmp_path / "bad")
  for step in (1, 2):
    victim = _largest_file(bad / f"step_{step:05d}")
    open(victim, "wb").write(open(victim, "rb").read()[:10])
  p, _ = _cli(*BASE_FLAGS, f"--resume={bad}", f"--output={tmp_path / 'w.mp4'}")
  assert p.returncode in (1, 2) and "Traceback" not in p.stderr, p.stderr
  (line,) = p.stderr.strip().splitlines()
  assert line.startswith(f"error: resume='{bad}' holds no usable state: step 2 (step_00002): "), line
  assert "TensorStore" not in line and "{" not in line, line
  # a truncated run.json: named by validation
  meta = (copy / "run.json").read_bytes()
  (copy / "run.json").write_bytes(meta[: len(meta) // 2])
  with pytest.raises(ValueError, match=rf"resume='{copy}': run.json cannot be read \(truncated or damaged\?\)"):
    pipeline.validate(cfg(resume=str(copy)))
  (copy / "run.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="run.json holds no 'fingerprint' object"):
    pipeline.validate(cfg(resume=str(copy)))


# ---------------------------------------------------------------------------------------------
# Flags checked too late before: refused up front, exit 2, the flag named, no traceback, no file.


def _weights_dir(tmp_path, name, content):
  d = tmp_path / name
  d.mkdir()
  (d / "config.json").write_text(content)
  return d


# Each command line gets several bad flags of one stage (the messages list every one); id: (flags, files
# to make in the inputs folder {name: bytes}, the messages).
LATE = {
  "paths_seed_dtype": (
    [
      "--output=/proc/x/y.mp4",
      "--save_latents=/proc/x/l.npy",
      "--compilation_cache_dir=/proc/x",
      "--state_dir=/proc/x",
      "--save_state_every=1",
      f"--seed={2**31}",
      "--dtype=float16",
    ],
    {},
    [
      "output='/proc/x/y.mp4': cannot write in '/proc/x'",
      "save_latents='/proc/x/l.npy': cannot write in '/proc/x'",
      "compilation_cache_dir='/proc/x': cannot write in '/proc'",
      "state_dir='/proc/x': cannot write in '/proc'",
      "seed=2147483648, expected an integer in -2147483648..2147483647",
      "dtype='float16' does not run on CPU",
    ],
  ),
  "seed_weights": (
    [f"--seed={2**70}", "--weights=@w", "--model="],
    {"w/config.json": b'{"model": 5}'},
    [f"seed={2**70}, expected an integer in", "config.json: 'model' is 5, expected an object"],
  ),
  "output_coordinator": (
    ["--output=", "--coordinator_address=garbage"],
    {},
    ["output='' is empty", "coordinator_address='garbage', expected host:port (port 1..65535)"],
  ),
  "prompts_file": (
    ["--prompts_file=@p.txt"],
    {"p.txt": bytes(range(256))},
    ["p.txt' is not a UTF-8 text file: line 2, column 118 (invalid start byte)"],
  ),
  # issue 25: absl's message ("'utf-8' codec can't decode byte 0xe9 in position 37") named neither file nor line
  "flagfile_not_utf8": (
    ["--flagfile=@outer.flags"],
    {"outer.flags": b"--steps=2\n--flagfile=@inner.flags\n", "inner.flags": b"--frames=16\n--prompt=caf\xe9\n"},
    ["error: --flagfile=@inner.flags is not UTF-8 text: line 2, column 13 (invalid continuation byte)"],
  ),
  "flagfile": (["--flagfile=/nonexistent"], {}, ["--flagfile=/nonexistent: no such file"]),
}


@pytest.mark.parametrize("case", list(LATE))
def test_refused_up_front(tmp_path, case):
  """Exit 2 before anything loads (the /proc paths too: tried, not guessed), each flag named, no traceback,
  no file or folder made. "Before anything loads" is shown by the output, not timed: a wall-clock bound
  failed CI once (10.7 s against 10, four test workers on two cores)."""
  args, files, msgs = LATE[case]
  inputs = tmp_path / "inputs"
  for name, data in files.items():
    (inputs / name).parent.mkdir(parents=True, exist_ok=True)
    (inputs / name).write_bytes(data)
  inputs.mkdir(exist_ok=True)
  args = [a.replace("=@", f"={inputs}/") for a in args]
  msgs = [m.replace("=@", f"={inputs}/") for m in msgs]
  for name, data in files.items():  # a flagfile naming another
    (inputs / name).write_bytes(data.replace(b"=@", f"={inputs}/".encode()))
  p, _ = _cli(*BASE_FLAGS, f"--output={tmp_path / 'out' / 'v.mp4'}", *args)
  assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
  assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
  for msg in msgs:
    assert msg in p.stderr, (msg, p.stderr)
  assert "random weights" not in p.stdout and "compiled" not in p.stdout  # nothing loaded or compiled
  assert sorted(os.listdir(tmp_path)) == ["inputs"]  # no output, no folder made for it


def test_prompts_files_and_coordinator_named(tmp_path):
  (tmp_path / "p.bin").write_bytes(b"a\x00b")
  (tmp_path / "p.txt").write_bytes(b"# a comment\n\n")
  with pytest.raises(ValueError, match=rf"prompts_file='{tmp_path}/p.bin' is a binary file"):
    sample.read_prompts(str(tmp_path / "p.bin"))
  with pytest.raises(ValueError, match=rf"prompts_file='{tmp_path}/p.txt' holds no prompt"):
    sample.read_prompts(str(tmp_path / "p.txt"))
  with pytest.raises(ValueError, match=rf"prompts_file='{tmp_path}/none.txt': No such file"):
    sample.read_prompts(str(tmp_path / "none.txt"))
  for bad in ("host0:http", "host0:0", ":1234", "host0"):
    sample.parse_flags(["sample", "--prompt=a", f"--coordinator_address={bad}"])
    assert any(f"coordinator_address='{bad}', expected host:port" in m for m in sample.check_cli_flags()), bad
  sample.parse_flags(["sample", "--prompt=a", "--coordinator_address=host0:1234", "--num_processes=2"])
  assert sample.check_cli_flags() == []


def test_bad_model_config_fields_are_named(tmp_path):
  from vinf_jax.config import TINY

  good = {"format_version": 1, "model": json.loads(TINY.to_json()), "components": []}
  cases = [
    ({"model": {"name": "tiny"}}, "'model.unet' is None, expected an object of UNetConfig fields"),
    ({"model": good["model"] | {"unet": {"model_channels": "32"}}}, "'model.unet.model_channels' is '32', expected"),
    ({"model": good["model"] | {"vae": {"ch_mult": "1,2"}}}, "'model.vae.ch_mult' is '1,2', expected a tuple"),
    ({"model": good["model"] | {"text": {"heads": 5}}}, "invalid TextConfig: width=1024 not divisible by heads=5"),
    ({"model": good["model"], "components": "unet"}, "'components' is 'unet', expected a list"),
    ([], "holds a JSON list, expected an object"),
  ]
  for i, (meta, msg) in enumerate(cases + [('{"model": {"na', "is not valid JSON .truncated or edited")]):
    d = _weights_dir(tmp_path, f"w{i}", meta if isinstance(meta, str) else json.dumps(meta))
    with pytest.raises(ValueError, match=r"weights=.*config.json:? " + msg.replace("(", r"\(").replace(")", r"\)")):
      pipeline.validate(cfg(weights=str(d), model=""))


def test_readme_command_outside_the_repo_root(tmp_path):
  """The quick start's flagfile is found from any directory (here refused at once by a bad --frames)."""
  env = dict(os.environ, PYTHONPATH=ROOT)  # this checkout's package (an editable install points to one too)
  p, _ = _cli("--flagfile", "configs/demo_tiny.flags", "--frames=30", cwd=tmp_path, env=env)
  assert p.returncode == 2 and "frames=30 is not divisible by the 8 devices" in p.stderr, p.stderr
  assert os.listdir(tmp_path) == []


def test_nan_advice_fits_the_settings():
  plan = lambda dt: pipeline.Resolved(model=None, num_devices=1, dtype=dt, tokenizer_dir=None)  # noqa: E731
  f32 = pipeline.run.nan_advice(cfg(), plan("float32"))
  assert "already float32" in f32 and "try dtype=float32" not in f32.lower()
  assert "bfloat16" in pipeline.run.nan_advice(cfg(), plan("float16"))
  assert "try dtype=float32" in pipeline.run.nan_advice(cfg(), plan("bfloat16")).lower()
  assert "lower guidance" in pipeline.run.nan_advice(cfg(guidance=80.0), plan("float32"))


# ---------------------------------------------------------------------------------------------
# The official global-frame rule: the single-GPU example runs.


def test_official_single_gpu_example_runs(models, tmp_path):
  """24 frames, 16 global frames, one device, the official semantics (as examples/single_gpu.json)."""
  official = dict(frames=24, num_global=16, window=8, num_devices=1, group_norm="local", video_ends="zeros", steps=2)
  with pytest.raises(ValueError, match=r"frames=24 is not divisible by num_global G=16 \(global_frames=video;"):
    pipeline.validate(cfg(**official))
  assert parallel.global_positions(24, 16, 1, "official") == tuple(range(16))
  r = pipeline.generate(
    cfg(**official, global_frames="official", output=str(tmp_path / "v.gif")), models=models, log=quiet
  )
  assert r.frames.shape == (24, 64, 64, 3) and np.isfinite(r.latents).all()
  side = json.loads((tmp_path / "v.json").read_text())
  assert side["settings"]["global_frames"] == "official" and side["settings"]["num_devices"] == 1
