"""SIGTERM and Ctrl-C, and what runs leave behind (issue 25, items 2 and 5).

Real signals to the command line (``tests._signal_worker``: the command line with a pause in one phase) on CPU,
in each phase: before sampling nothing is saved, during and after it the state is saved and resumes, the
partial files go, one line gives the command that continues, the exit status is 128 + signal, and a second
signal stops at once. A resumed run that wrote its video removes the states it came from; orbax's unfinished
checkpoints are removed; a ``run.json`` copied from another run does not pass its latents off. Each run is
the tiny model, 8 frames at 64x64 on one device, 3 steps (its programs compile once per test run).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from vinf_jax import video_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
  "--flagfile=configs/demo_tiny.flags",
  "--num_devices=1",
  "--frames=8",
  "--height=64",
  "--width=64",
  "--steps=3",
  "--window=4",
  "--num_global=4",
]


def _env(tmp_path, **extra) -> dict:
  systmp = tmp_path / "systmp"
  systmp.mkdir(exist_ok=True)
  return os.environ | {"TMPDIR": str(systmp)} | extra


def _start(tmp_path, phase: str, *flags: str, hold: bool = False) -> subprocess.Popen:
  """The command line paused in ``phase`` (it has printed ``PAUSED PHASE``)."""
  env = _env(tmp_path, VINF_TEST_PAUSE=phase, **({"VINF_TEST_HOLD": "1"} if hold else {}))
  cmd = [sys.executable, "-m", "tests._signal_worker", *FLAGS, *flags]
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  timer = threading.Timer(300, p.kill)  # a run that never gets to its pause fails the test, not the suite
  timer.start()
  seen = []
  for line in p.stdout:
    seen.append(line)
    if line.startswith(f"PAUSED {phase}"):
      break
  timer.cancel()
  assert seen and seen[-1].startswith("PAUSED"), "".join(seen) + p.stderr.read()
  return p


def _finish(p: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
  out, err = p.communicate(timeout=timeout)
  print(out, err)
  assert "Traceback" not in err, err
  return out, err


def _stopped_line(err: str) -> str:
  (line,) = [ln for ln in err.splitlines() if ln.startswith("stopped: ")]
  return line


def _command(line: str, marker: str) -> list[str]:
  """The command the line gives, runnable here."""
  cmd = shlex.split(line.split(marker, 1)[1])
  assert cmd[:3] == ["python", "-m", "vinf_jax.sample"], cmd
  return [sys.executable, *cmd[1:]]


@pytest.mark.parametrize("phase,sig", [("load", signal.SIGINT), ("compile", signal.SIGTERM)])
def test_a_stop_before_sampling_saves_nothing_and_says_so(tmp_path, phase, sig):
  out = tmp_path / "out" / "v.mp4"
  p = _start(tmp_path, phase, f"--output={out}")
  p.send_signal(sig)
  _, err = _finish(p)
  assert p.returncode == 128 + sig, (p.returncode, err)
  what = {"load": "while loading the models", "compile": "while compiling the step"}[phase]
  line = _stopped_line(err)
  assert f"stopped by {signal.Signals(sig).name} {what}, before sampling: nothing to save; to start again: " in line
  assert _command(line, "to start again: ")[3:] == [*FLAGS, f"--output={out}"]
  assert not out.parent.exists() or os.listdir(out.parent) == []  # no video, partial file or lock
  assert os.listdir(tmp_path / "systmp") == []


def test_a_stop_while_sampling_saves_the_state_and_the_command_continues(tmp_path):
  """SIGTERM during step 2: the step ends, its state is the resumable one, the printed command continues from
  it and writes the video."""
  state, out = tmp_path / "state", tmp_path / "out" / "v.mp4"
  p = _start(tmp_path, "step", f"--state_dir={state}", "--save_state_every=1", f"--output={out}")
  p.send_signal(signal.SIGTERM)
  _, err = _finish(p)
  assert p.returncode == 143, err
  line = _stopped_line(err)
  assert f"stopped by SIGTERM after step 2/3; the state of step 2 is saved in {state}; to continue: " in line, line
  assert sorted(os.listdir(state)) == ["run.json", "step_00001", "step_00002"]
  assert not out.parent.exists()  # no video, partial file or lock
  r = _run(tmp_path, *_command(line, "to continue: ")[3:])
  assert r.returncode == 0 and f"resumed from {state} at step 2/3" in r.stdout, r.stderr
  assert video_io.read_video(str(out)).shape == (8, 64, 64, 3)


def _run(tmp_path, *flags: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "vinf_jax.sample", *flags]
  r = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  print(r.stdout, r.stderr)
  assert "Traceback" not in r.stderr, r.stderr
  return r


def test_leftovers_go_and_a_copied_run_json_passes_no_latents_off(tmp_path):
  """A run.json of other settings (seed 1) beside latents of seed 0 is refused, not resumed under seed 1; an
  unfinished orbax checkpoint (a kill during a save) is removed; a resumed run that wrote its video removes
  the states it came from."""
  state, out = tmp_path / "state", tmp_path / "out" / "v.mp4"
  assert _run(tmp_path, *FLAGS, f"--state_dir={state}", "--save_state_every=1", "--stop_after=2").returncode == 0
  assert sorted(os.listdir(state)) == ["run.json", "step_00001", "step_00002"]
  other = tmp_path / "other"
  shutil.copytree(state, other)
  meta = json.loads((other / "run.json").read_text())
  meta["fingerprint"]["seed"] = 1
  (other / "run.json").write_text(json.dumps(meta))
  (other / "step_00003.orbax-checkpoint-tmp-1712345678").mkdir()
  r = _run(tmp_path, *FLAGS, "--seed=1", f"--resume={other}", f"--output={out}")
  assert r.returncode == 2, r.stderr
  assert f"resume='{other}' holds no usable state: step 2 (step_00002): its arrays were made under other" in r.stderr
  assert sorted(os.listdir(other)) == ["run.json", "step_00001", "step_00002"] and not out.exists()
  # the resume that writes the video: the states are stale, and go
  (state / "step_00003.orbax-checkpoint-tmp-1712345678").mkdir()
  r = _run(tmp_path, *FLAGS, f"--resume={state}", f"--output={out}")
  assert r.returncode == 0 and f"removed the saved states in {state}" in r.stdout, r.stderr
  assert video_io.read_video(str(out)).shape == (8, 64, 64, 3)
  assert not state.exists() and sorted(os.listdir(out.parent)) == ["v.json", "v.mp4"]


@pytest.mark.parametrize("phase,sig", [("decode", signal.SIGTERM), ("write", signal.SIGINT)])
def test_a_stop_while_decoding_or_writing_saves_the_final_state(tmp_path, phase, sig):
  """No state_dir: the final state goes to the temporary folder; no output, partial file or lock stays."""
  out = tmp_path / "out"
  p = _start(tmp_path, phase, f"--output={out / 'v.mp4'}", f"--save_latents={out / 'l.npy'}")
  if phase == "write":
    assert [n for n in os.listdir(out) if n.startswith(".v.partial-")], os.listdir(out)  # what the stop removes
  p.send_signal(sig)
  _, err = _finish(p)
  assert p.returncode == 128 + sig, err
  (rescue,) = [tmp_path / "systmp" / n for n in os.listdir(tmp_path / "systmp")]
  assert rescue.name.startswith("vinf_jax-rescue-v-") and sorted(os.listdir(rescue)) == ["run.json", "step_00003"]
  line = _stopped_line(err)
  what = {"decode": "while decoding", "write": "while decoding and writing (nothing was written)"}[phase]
  what = f"stopped by {signal.Signals(sig).name} {what}; the state of step 3 is saved in {rescue}; to continue: "
  assert what in line, line
  assert _command(line, "to continue: ")[-1] == f"--resume={rescue}"
  assert not out.exists() or os.listdir(out) == [], os.listdir(out)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
  """The first Ctrl-C waits for the step (here one that takes a minute); the second ends the process now."""
  p = _start(tmp_path, "step", f"--output={tmp_path / 'v.mp4'}", hold=True)
  p.send_signal(signal.SIGINT)
  time.sleep(1)
  t = time.perf_counter()
  p.send_signal(signal.SIGINT)
  _, err = _finish(p, timeout=55)
  # the held step waits 60 s: ending well before that shows the second Ctrl-C did not wait for it
  assert p.returncode == 130 and time.perf_counter() - t < 45, err
  assert "SIGINT: stopping after what runs now (again to stop at once)" in err
  assert "SIGINT again: stopping at once" in err


def test_atomic_files_clean_up_after_a_keyboard_interrupt(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with video_io.AtomicFiles() as files:
      with open(files.add(str(tmp_path / "sub" / "v.json")), "w") as f:
        f.write("{")
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == []
