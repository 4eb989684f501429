"""The web page's request handler (``vinf_jax.app.Handler``) on the tiny model, in-process on CPU.

No Gradio here (the handler does not need it; ``tests/test_app_browser.py`` drives the real page): page values
to settings, the command line's messages for bad settings, progress per step, compiled programs reused
between requests, cancel at the next step with nothing written, one video at a time, and the multi-host
follower protocol (its messages, and two processes on localhost with gloo).
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from vinf_jax import app, pipeline, sample, sampling, video_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 8 frames at 64x64 over 2 devices (4 frames each, window 2, 4 global frames), 2 steps: a second a request.
BASE = pipeline.GenerationConfig(
  prompts=("a red panda eating bamboo",),
  model="tiny",
  frames=8,
  height=64,
  width=64,
  steps=2,
  window=2,
  num_global=4,
  num_devices=2,
  decode_chunk=4,
  fps=24,
  export_fps=12.0,
)
PAGE = {"prompts": "a koi pond in autumn", "seed": 5}


@pytest.fixture(scope="module")
def models():
  return pipeline.load_models(BASE, log=lambda m: None)


@pytest.fixture
def handler(models, tmp_path):
  return app.Handler(BASE, models, str(tmp_path / "outputs"), echo=False)


def outputs(h: app.Handler) -> list[str]:
  return sorted(os.listdir(h.outputs_dir)) if os.path.isdir(h.outputs_dir) else []


def test_page_config():
  base = dataclasses.replace(BASE, resume="/somewhere", stop_after=3, save_latents="l.npy")
  values = {"prompts": "  first \n\n second\n", "frames": 16.0, "guidance": 7, "seed": 3, "negative_prompt": None}
  cfg = app.page_config(base, values, "out/v.mp4")
  assert cfg.prompts == ("first", "second") and cfg.negative_prompt == ""
  assert cfg.frames == 16 and type(cfg.frames) is int and cfg.guidance == 7.0 and type(cfg.guidance) is float
  assert cfg.seed == 3 and cfg.output == "out/v.mp4"
  assert (cfg.fps, cfg.export_fps, cfg.height, cfg.steps) == (24, 12.0, 64, 2)  # from the flags
  assert (cfg.resume, cfg.stop_after, cfg.save_latents) == ("", 0, "")  # one command-line run's settings
  # a non-integral number is left to validate (the command line's message); empty boxes are named here
  assert app.page_config(BASE, {"frames": 16.5}, "").frames == 16.5
  with pytest.raises(ValueError) as err:
    app.page_config(BASE, {"frames": None, "guidance": "", "width": "wide"}, "")
  assert str(err.value) == (
    "invalid settings:\n  - frames: empty, expected a number\n  - width='wide', expected a number\n"
    "  - guidance: empty, expected a number"
  )
  with pytest.raises(ValueError, match="unknown page fields"):
    app.page_config(BASE, {"fps": 8}, "")
  assert app.page_values(cfg)["prompts"] == "first\nsecond"
  assert set(app.page_values(cfg)) == set(app.FIELDS)


def test_sampler_choices(models):
  # every sampler but 'turbo' (which needs a guidance embedding the tiny model lacks)
  assert app.sampler_choices(models.config) == [s for s in sampling.SAMPLERS if s != "turbo"]
  assert "dpmpp_sde" in app.sampler_choices(models.config) and "ddim" in app.sampler_choices(models.config)
  assert not app.sampler_supported("turbo", models.config)
  # a T2V-Turbo model runs the turbo sampler only (the guided ones are refused by validation for it)
  from vinf_jax.config import PRESETS

  assert app.sampler_choices(PRESETS["tiny_turbo"]) == ["turbo"]
  assert app.page_values(pipeline.GenerationConfig(sampler="turbo"))["guidance"] == 7.5


def test_request_messages_round_trip():
  cfg = dataclasses.replace(
    BASE,
    prompts=("a koi pond in autumn", "ein Fuchs im Schnee, 夜"),
    negative_prompt='blurry, "low" quality',
    guidance=7.25,
    global_bias=-0.1,
    ddim_exact_steps=True,
    output="/tmp/x/20260101_0001_seed5.mp4",
  )
  data = app.encode_request("generate", cfg)
  assert isinstance(data, bytes)
  assert app.decode_request(data) == ("generate", cfg)
  assert app.decode_request(app.encode_request("stop")) == ("stop", None)
  for bad in (("generate", None), ("stop", cfg), ("run", cfg)):
    with pytest.raises(ValueError):
      app.encode_request(*bad)
  with pytest.raises(ValueError, match="unknown request"):
    app.decode_request(json.dumps({"op": "dance"}).encode())
  # one process: the channel sends nothing and the stop function is the local one
  ch = app.Channel()
  assert not ch.multi
  ch.send(data)
  flag = [False]
  stop = ch.agreed(lambda: flag[0])
  assert stop() is False
  flag[0] = True
  assert stop() is True


def test_bad_settings_give_the_command_lines_messages(handler, models):
  before = models.programs.kept()
  page = {"prompts": "a\n\n", "frames": 7, "height": 100, "guidance": -1.0, "num_global": 3}
  reply = handler.run(page)
  # the same settings through the command line's flags
  sample.parse_flags(
    [
      "sample",
      "--model=tiny",
      "--prompt=a",
      "--frames=7",
      "--height=100",
      "--width=64",
      "--guidance=-1",
      "--steps=2",
      "--window=2",
      "--num_global=3",
      "--num_devices=2",
      "--decode_chunk=4",
      f"--output={handler.outputs_dir}/cli.mp4",
    ]
  )
  with pytest.raises(ValueError) as err:
    pipeline.validate(sample.config_from_flags())
  assert not reply.ok and reply.video is None and reply.settings is None
  assert reply.status == f"error: {err.value}", reply.status
  for name in ("frames=7", "height=100", "guidance=-1.0"):
    assert name in reply.status, (name, reply.status)
  assert outputs(handler) == [] and models.programs.kept() == before
  assert handler.run({"frames": None}).status == "error: invalid settings:\n  - frames: empty, expected a number"


def test_every_bad_setting_is_named_at_once(handler):
  """An empty box no longer hides the others: its message comes with validate's for the rest (issue 25)."""
  reply = handler.run({"frames": None, "height": 100, "steps": [3], "seed": True, "prompts": 7})
  assert reply.status.startswith(
    "error: invalid settings:\n  - prompts=7 (int), expected text\n  - frames: empty, expected a number\n"
    "  - steps=[3] (list), expected a number\n  - seed=True (bool), expected a number\n"
    "  - height=100 is not a positive multiple of 64"
  ), reply.status
  assert reply.status.count("\n  - ") == 5, reply.status
  # the flags' frames stand in for an empty box: what validate says of them (8 on 3 devices) is left out ...
  reply = handler.run({"frames": "", "num_devices": 3})
  assert reply.status == "error: invalid settings:\n  - frames: empty, expected a number", reply.status
  # ... and what it says of the page's own values is kept
  assert handler.run({"frames": 7, "window": ""}).status == (
    "error: invalid settings:\n  - window: empty, expected a number\n"
    "  - frames=7 is not divisible by the 2 devices of the 'frames' axis\n"
    "  - frames that work on 2 device(s) with these temporal settings: 8"
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _server(tmp_path):
  """``python -m vinf_jax.app`` on the tiny model (BASE's shape) on a free port of localhost: ``(url, lines)``,
  the lines of its terminal so far (all of them once closed, with Ctrl-C)."""
  flags = ["--flagfile=configs/demo_tiny.flags", "--frames=8", "--height=64", "--width=64", "--window=2"]
  port, out = _free_port(), tmp_path / "outputs"
  flags += ["--num_global=4", "--steps=2", "--num_devices=2", f"--port={port}", f"--outputs_dir={out}"]
  env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"), PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "vinf_jax.app", *flags]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()
  url = f"http://127.0.0.1:{port}"
  t0 = time.monotonic()
  try:
    while True:
      try:
        urllib.request.urlopen(url, timeout=5).read()
        break
      except OSError:
        assert proc.poll() is None and time.monotonic() - t0 < 180, "".join(lines)[-3000:]
        time.sleep(0.3)
    yield url, lines
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(60)
      reader.join(10)
    finally:
      proc.kill()


def test_page_api_names_bad_values_without_a_traceback(tmp_path):
  """The page's /generate through gradio_client and raw HTTP: missing or wrongly typed values get the
  settings' messages in the status (as on the page), and the server's terminal shows no traceback."""
  pytest.importorskip("gradio")
  from gradio_client import Client

  with _server(tmp_path) as (url, lines):
    good = ["a fox", "", 8, 64, 64, "ddim", 2, 7.5, 1, "dual", 2, 4, 2]
    client = Client(url + "/", verbose=False)
    bad = dict(enumerate(good)) | {2: None, 3: 100, 5: "nope", 8: "x"}
    status = client.predict(*bad.values(), api_name="/generate")[0]
    assert status == (
      "```text\nerror: invalid settings:\n  - frames: empty, expected a number\n  - seed='x', expected a number\n"
      "  - height=100 is not a positive multiple of 64 (the VAE downsamples by 8 and the UNet by 8 more); e.g. 128\n"
      "  - sampler='nope', expected one of ddim, dpmpp_sde, turbo\n```"
    ), status
    status = client.predict(prompts=["a list"], frames="eight", api_name="/generate")[0]
    assert "  - prompts=['a list'] (list), expected text\n  - frames='eight', expected a number\n```" in status, status

    def post(data) -> list:
      req = urllib.request.Request(
        url + "/gradio_api/call/generate", json.dumps({"data": data}).encode(), {"Content-Type": "application/json"}
      )
      event = json.loads(urllib.request.urlopen(req, timeout=60).read())["event_id"]
      text = urllib.request.urlopen(f"{url}/gradio_api/call/generate/{event}", timeout=60).read().decode()
      assert "event: complete" in text, text  # not "event: error" with {"error": null}
      return json.loads(text.split("event: complete\ndata: ", 1)[1].splitlines()[0])

    status = post(["a fox"])[0]  # 1 of the 13 values: the others are named as empty
    for name in ("frames", "height", "width", "steps", "guidance", "seed", "window", "num_global", "num_devices"):
      assert f"  - {name}: empty, expected a number\n" in status, (name, status)
    assert "sampler=None, expected one of" in status and "attention=None, expected 'full' or 'dual'" in status
    status = post(good[:2] + [{"frames": 8}] + good[3:])[0]
    assert status == "```text\nerror: invalid settings:\n  - frames={'frames': 8} (dict), expected a number\n```"
  assert "Traceback" not in "".join(lines), "".join(lines)[-3000:]
  assert not (tmp_path / "outputs").exists() or os.listdir(tmp_path / "outputs") == []


def test_request_makes_the_video_then_reuses_the_programs(handler, models):
  models.programs.clear()  # a fresh start whatever ran before
  seen = []
  reply = handler.run(PAGE, progress=lambda done, total, desc: seen.append((done, total, desc)))
  assert reply.ok, reply.status
  assert reply.status.startswith("done: 8 frames at 64x64 over 2 device(s) in ")
  assert reply.status.endswith(
    "; compiled a new step and decode program for this shape ({:.1f} s)".format(
      reply.settings["timings_s"]["compile"] + reply.settings["timings_s"]["decode_compile"]
    )
  )
  video = video_io.read_video(reply.video)
  assert video.shape == (8, 64, 64, 3) and video.std() > 5
  assert os.path.dirname(reply.video) == handler.outputs_dir and reply.video.endswith("_seed5.mp4")
  with open(reply.sidecar) as f:
    side = json.load(f)
  assert side["prompts"] == ["a koi pond in autumn"] and side["seed"] == 5
  assert side["settings"] == json.loads(json.dumps(reply.settings["settings"]))
  assert side["settings"]["fps"] == 24 and side["settings"]["export_fps"] == 12.0  # from the flags
  # progress: compiling, then each step with ETA, then decoding
  assert seen[0][:2] == (0, 2) and seen[0][2].startswith("compiling a new step program for this shape")
  assert [s[:2] for s in seen[1:]] == [(1, 2), (2, 2)]
  assert seen[1][2].startswith("step 1/2  t=") and "s/step  ETA 0:" in seen[1][2]
  assert seen[2][2] == "step 2/2 done; decoding and writing the video"
  assert "compiled the guided step" in reply.log and "step   2/2" in reply.log

  # Another seed and prompt of the same shape: nothing compiles.
  again = app.page_config(handler.base, {"prompts": "a fox", "seed": 6}, "")
  assert pipeline.will_compile(again, models) == ()
  assert pipeline.will_compile(dataclasses.replace(again, frames=16), models) == ("step", "decode")
  assert pipeline.will_compile(dataclasses.replace(again, steps=3), models) == ("step",)
  assert pipeline.will_compile(dataclasses.replace(again, decode_chunk=2), models) == ("decode",)
  seen.clear()
  text_programs = pipeline.prompts.compiled_count()
  second = handler.run({"prompts": "a fox", "seed": 6}, progress=lambda *a: seen.append(a))
  assert second.ok and second.status.endswith("; reused the compiled programs"), second.status
  assert pipeline.prompts.compiled_count() == text_programs  # nor the text encoder's
  assert seen[0][2].startswith("encoding the prompts (8 frames at 64x64 over 2 device(s); the compiled step")
  assert second.settings["timings_s"]["compile"] < 0.1  # the step program was not compiled again
  assert second.video != reply.video and np.abs(video_io.read_video(second.video).astype(int) - video).max() > 0
  assert len(outputs(handler)) == 4 and not [n for n in outputs(handler) if ".partial-" in n]

  # A prompt over the text encoder's 77 tokens: the page says so under the status, as the log does (issue 25).
  third = handler.run({"prompts": "a fox in the snow " * 5, "seed": 7})
  done, warning = third.status.split("\n")
  assert third.ok and done.endswith("; reused the compiled programs"), third.status
  assert warning == (
    "warning: the text encoder reads the first 75 tokens of a prompt (77 with its start and end) and drops the "
    "rest: prompt 1 of 1 has 89 tokens (the last 14 dropped); shorten them to keep every word"
  )
  assert warning in third.log.splitlines() and third.settings["prompts_truncated"][0]["dropped"] == 14


def test_cancel_stops_at_the_next_step(handler):
  waited = []  # what the page's Cancel shows: it waits for the request to stop and says how it ended

  def cancel_after_first(done, total, desc):
    if done == 1:
      assert handler.cancel("s1") == "cancelling: the request stops before its next step"
      waiter.start()

  waiter = threading.Thread(target=lambda: waited.append(handler.cancel("s1", wait_s=60)))
  reply = handler.run(PAGE, session="s1", progress=cancel_after_first)
  waiter.join(60)
  assert not reply.ok and reply.status == "cancelled before step 2/2; nothing was written", reply.status
  assert waited == [reply.status]
  assert reply.video is None and outputs(handler) == []  # no video, no sidecar, no partial file
  assert "step   1/2" in reply.log and "step   2/2" not in reply.log
  # nothing left flagged: the session's next request runs
  assert handler.cancel("s1") == "nothing of this page is running (a waiting request is taken off the queue)"
  assert handler.run(PAGE, session="s1").ok


def test_one_video_at_a_time(handler):
  """A request waits while another runs; a waiting one cancelled never starts; the next one runs after."""
  replies, waiting, times = {}, {"b": threading.Event(), "c": threading.Event()}, {}

  def start(session, values):
    def progress(done, total, desc):
      if desc == "waiting for the running video to stop":
        waiting[session].set()
      elif done == 0:
        times[session] = time.monotonic()  # the request got the models

    def body():
      replies[session] = handler.run(values, session=session, progress=progress)

    t = threading.Thread(target=body)
    t.start()
    return t

  def a_progress(done, total, desc):
    if done == 1:  # while a runs: b and c arrive and must wait
      threads.extend([start("b", PAGE), start("c", {**PAGE, "seed": 9})])
      assert waiting["b"].wait(60) and waiting["c"].wait(60)
      assert handler.cancel("b") == "cancelling: the request stops before its next step"

  threads = []
  replies["a"] = handler.run(PAGE, session="a", progress=a_progress)
  t_a = time.monotonic()
  for t in threads:
    t.join(120)
  assert replies["a"].ok, replies["a"].status
  assert replies["b"].status == "cancelled before it started; nothing was written" and replies["b"].log == ""
  assert replies["c"].ok and times["c"] >= t_a, replies["c"].status
  assert len(outputs(handler)) == 4  # a's and c's videos and sidecars


def test_two_processes_follow_process_0(tmp_path):
  """2 processes x 2 CPU devices (gloo): process 0 handles two requests (one cancelled), process 1 follows."""

  def worker(pid, port):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "tests._app_multihost_worker", str(pid), str(port), str(tmp_path)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [worker(i, port) for i in range(2)]
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=600)
    outs.append(out)
    assert p.returncode == 0, out[-3000:]
  with open(tmp_path / "replies.json") as f:
    done, cancelled = json.load(f)
  assert done["ok"], done["status"]
  assert done["status"].startswith("done: 8 frames at 64x64 over 2 device(s)")
  assert video_io.read_video(done["video"]).shape == (8, 64, 64, 3)
  with open(done["sidecar"]) as f:
    devices = json.load(f)["devices"]
  assert devices["count"] == 2 and devices["processes"] == 2
  assert cancelled == {"ok": False, "status": "cancelled before step 2/2; nothing was written", "video": None}
  assert "process 1: followed 2 request(s)" in outs[1], outs[1][-2000:]
  assert "request 2: cancelled before step 2/2; nothing was written" in outs[1], outs[1][-2000:]


def test_importing_the_app_leaves_the_sample_flags_alone():
  assert "port" not in sample.F and "outputs_dir" not in sample.F  # test_configs checks sample's --helpfull


def test_command_line(tmp_path):
  """``python -m vinf_jax.app``: --help lists the sample flags and the page's; bad flags stop it before loading."""
  run = lambda *a: subprocess.run([sys.executable, "-m", "vinf_jax.app", *a], cwd=ROOT, capture_output=True, text=True)
  p = run("--helpfull")
  assert p.returncode == 0 and "python -m vinf_jax.app" in p.stdout
  for flag in ("--port", "--share", "--outputs_dir", "--prompt", "--frames", "--weights"):
    assert flag in p.stdout, flag
  p = run("--flagfile=configs/demo_tiny.flags", "--frames=30", "--height=100", f"--outputs_dir={tmp_path / 'out'}")
  assert p.returncode == 2, p.stdout + p.stderr
  if importlib.util.find_spec("gradio") is None:
    assert p.stderr.strip() == 'error: the page needs gradio: pip install -e ".[app]"'
  else:
    assert p.stderr.startswith("error: invalid settings:\n  - height=100 is not a positive multiple of 64"), p.stderr
    assert "frames=30 is not divisible by the 8 devices" in p.stderr, p.stderr
  assert "random weights" not in p.stdout and not (tmp_path / "out").exists()  # nothing loaded or written
