"""The end-to-end sampler: the demo flagfile through the CLI, device-count invariance of the written latents,
multi-prompt videos, resume, and every bad-input case with its message, exit code and no file left behind.

In-process runs share one set of tiny random models (``pipeline.generate(models=...)`` keeps the compiled
programs of the last settings), so only a change of device count or shape recompiles.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_parallel import tame
from vinf_jax import pipeline, sample, video_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # float32; summation order differs between device counts (see test_parallel.py)

# 16 frames at 64x64 (latent 8x8): 4 frames per device on 4 devices, window 2, 4 global frames.
BASE = pipeline.GenerationConfig(
  prompts=("a red panda eating bamboo",),
  model="tiny",
  frames=16,
  height=64,
  width=64,
  steps=3,
  guidance=7.5,
  window=2,
  num_global=4,
  num_devices=4,
  decode_chunk=3,
)


def cfg(**kw) -> pipeline.GenerationConfig:
  return dataclasses.replace(BASE, **kw)


def rel_err(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def models():
  m = pipeline.load_models(BASE)
  # Small residual branches, as in test_parallel.py: with raw random weights the float32 rounding of
  # different summation orders (~1e-6 a pass) grows chaotically to ~3e-5 over 3 guided steps.
  m.unet = tame(m.unet)
  return m


def quiet(msg):
  del msg


def test_demo_flagfile_end_to_end(tmp_path):
  """The README's second command, as written except for where the video goes."""
  out = tmp_path / "demo.mp4"
  cmd = [sys.executable, "-m", "vinf_jax.sample", "--flagfile", "configs/demo_tiny.flags", f"--output={out}"]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout + p.stderr
  print(p.stdout)
  assert "compiled the guided step" in p.stdout and "step  10/10" in p.stdout and "ETA" in p.stdout
  video = video_io.read_video(str(out))
  assert video.shape == (32, 128, 128, 3), video.shape
  assert video.std() > 5  # noise-like, not a black or constant video
  side = json.loads((tmp_path / "demo.json").read_text())
  assert side["prompts"] == ["a red panda eating bamboo in a misty forest"]
  assert side["seed"] == 0 and side["settings"]["steps"] == 10 and side["settings"]["sampler"] == "dpmpp_sde"
  assert side["devices"]["count"] == 8 and side["devices"]["processes"] == 1
  assert side["settings"]["num_devices"] == 8  # the count used, not the flag's 0 ("all")
  assert set(side["timings_s"]) >= {"load", "encode", "compile", "denoise", "decode", "write"}
  assert side["versions"]["jax"] and side["output"]["frames"] == 32
  assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_latents_same_on_one_and_four_devices(models, tmp_path):
  runs = {}
  for d in (1, 4):
    path = tmp_path / f"latents_{d}.npy"
    r = pipeline.generate(cfg(num_devices=d, save_latents=str(path), output=str(tmp_path / f"v{d}.gif")), models=models)
    runs[d] = np.load(path)
    assert runs[d].shape == (1, 16, 8, 8, 4) and runs[d].dtype == np.float32
    np.testing.assert_array_equal(runs[d], r.latents)
    assert video_io.read_video(str(tmp_path / f"v{d}.gif")).shape == (16, 64, 64, 3)
  err = rel_err(runs[4], runs[1])
  print(f"latents, 4 devices vs 1: rel err {err:.2e}")
  assert np.isfinite(runs[1]).all() and runs[1].std() > 0.1
  assert err <= RTOL, err


def test_prompt_weights():
  w = pipeline.prompt_weights(3, 12)
  np.testing.assert_array_equal(w.argmax(1), [0] * 4 + [1] * 4 + [2] * 4)
  assert set(np.unique(w)) == {0.0, 1.0}
  # uneven segments: frame f belongs to prompt floor(f * P / N)
  np.testing.assert_array_equal(pipeline.prompt_weights(3, 10).argmax(1), [int(f * 3 / 10) for f in range(10)])
  t = pipeline.prompt_weights(2, 16, transition=4)  # boundary at 8, ramp over frames 6..9
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(t[:, 1], [0] * 6 + [0.125, 0.375, 0.625, 0.875] + [1] * 6, atol=1e-6)
  np.testing.assert_array_equal(pipeline.prompt_weights(1, 5), np.ones((5, 1), np.float32))


def test_frame_contexts_follow_prompts_on_any_mesh(models):
  """Each frame's text is its prompt's embedding (or the blend), wherever the frame lives."""
  from vinf_jax import parallel

  emb = np.random.default_rng(0).standard_normal((3, 77, 32)).astype(np.float32)
  w = pipeline.prompt_weights(3, 24, transition=4)
  ref = np.einsum("np,psc->nsc", w, emb)
  for d in (1, 4, 8):
    ctx = pipeline.frame_contexts(emb, w, parallel.make_mesh(d))
    assert ctx.shape == (1, 24, 77, 32) and len(ctx.sharding.device_set) == d
    np.testing.assert_allclose(np.asarray(ctx)[0], ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(ref[0], emb[0])
  np.testing.assert_array_equal(ref[12], emb[1])


def test_multi_prompt_with_and_without_transition(models):
  two = ("a red panda eating bamboo", "a snowy mountain at night")
  cut = pipeline.generate(cfg(prompts=two), models=models, log=quiet).latents
  single = pipeline.generate(cfg(), models=models, log=quiet).latents
  blend = pipeline.generate(cfg(prompts=two, prompt_transition=4), models=models, log=quiet).latents
  # The second prompt changes the video; a transition changes it again (frames near the cut blend).
  assert rel_err(cut, single) > 1e-3 and rel_err(blend, cut) > 1e-4
  # The first segment stays closer to the single-prompt video than the second does.
  first, second = rel_err(cut[:, :8], single[:, :8]), rel_err(cut[:, 8:], single[:, 8:])
  assert first < second, (first, second)


def test_long_prompts_are_cut_with_one_warning(models, tmp_path):
  """Over the text encoder's 75 tokens (77 with start and end): one warning line, and the sidecar names each."""
  long, neg = "a red panda eating bamboo " * 4, "blurry " * 12  # 104 and 84 bytes for the tiny model's tokenizer
  logs = []
  out = tmp_path / "v.gif"
  r = pipeline.generate(
    cfg(prompts=("a cat", long), negative_prompt=neg, output=str(out)), models=models, log=logs.append
  )
  warnings = [ln for ln in logs if ln.startswith("warning:")]
  assert warnings == [
    "warning: the text encoder reads the first 75 tokens of a prompt (77 with its start and end) and drops the "
    "rest: prompt 2 of 2 has 103 tokens (the last 28 dropped); the negative prompt has 83 tokens (the last 8 "
    "dropped); shorten them to keep every word"
  ], logs
  cut = [
    {"prompt": 1, "tokens": 103, "kept": 75, "dropped": 28},
    {"prompt": "negative_prompt", "tokens": 83, "kept": 75, "dropped": 8},
  ]
  assert r.sidecar["prompts_truncated"] == cut
  assert json.loads((tmp_path / "v.json").read_text())["prompts_truncated"] == cut
  logs.clear()
  assert "prompts_truncated" not in pipeline.generate(cfg(), models=models, log=logs.append).sidecar
  assert not [ln for ln in logs if ln.startswith("warning:")]


def test_resume_equals_uninterrupted(models, tmp_path):
  state = tmp_path / "state"
  full = pipeline.generate(cfg(), models=models, log=quiet)
  part = pipeline.generate(cfg(save_state_every=1, state_dir=str(state), stop_after=2), models=models, log=quiet)
  assert part.latents is None and part.steps_done == 2 and part.num_steps == 3
  assert sorted(os.listdir(state)) == ["run.json", "step_00001", "step_00002"]  # the last two are kept
  # A resume with other settings is refused, naming what differs.
  with pytest.raises(ValueError, match=r"seed: saved 0, now 5"):
    pipeline.validate(cfg(resume=str(state), seed=5))
  out = tmp_path / "resumed.mp4"
  done = pipeline.generate(cfg(resume=str(state), output=str(out)), models=models)
  assert done.steps_done == 3
  np.testing.assert_array_equal(done.latents, full.latents)  # same programs, same inputs: bit-identical
  assert video_io.read_video(str(out)).shape == (16, 64, 64, 3)
  assert not state.exists()  # the video is written: its states are stale and gone


def test_nan_latents_stop_the_run(models, tmp_path):
  """Latents that turn NaN (here: a resumed state with one NaN value) stop the run; nothing is written."""
  from vinf_jax import parallel

  state_dir, poisoned = tmp_path / "state", tmp_path / "poisoned"
  pipeline.generate(cfg(state_dir=str(state_dir), stop_after=1), models=models, log=quiet)
  mesh = parallel.make_mesh(4)
  st = pipeline.state.restore_state(str(state_dir), mesh, (1, 16, 8, 8, 4))
  x = np.asarray(st.x).copy()
  x[0, 5, 3, 3, 0] = np.nan
  bad = dataclasses.replace(st, x=jax.device_put(x, st.x.sharding))
  pipeline.state.save_state(str(poisoned), bad, cfg())
  out = tmp_path / "out"
  out.mkdir()
  kw = dict(resume=str(poisoned), output=str(out / "nan.mp4"), save_latents=str(out / "l.npy"))
  with pytest.raises(FloatingPointError, match=r"NaN or inf after step 2/3.*nothing was written"):
    pipeline.generate(cfg(**kw), models=models, log=quiet)
  assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------
# Bad input: validated before anything is loaded or compiled.

BAD = [
  (dict(height=100), r"height=100 is not a positive multiple of 64"),
  (dict(width=0), r"width=0 is not a positive multiple of 64"),
  (dict(frames=18), r"frames=18 is not divisible by the 4 devices.*frames that work on 4 device\(s\).*16 or 20"),
  (dict(frames=8), r"frames per device=2 .* at least 4 frames per device"),
  (dict(frames=18, num_devices=1), r"frames=18 is not divisible by num_global G=4"),
  (dict(window=8), r"window P=8 is larger than the 4 frames each device holds"),
  (dict(sampler="euler"), r"sampler='euler', expected one of ddim, dpmpp_sde"),
  (dict(steps=0), r"steps=0, expected an integer in 1..999"),
  (dict(guidance=-1.0), r"guidance=-1.0, expected a finite value >= 0"),
  (dict(prompts=()), r"prompts: none given"),
  (dict(prompts=("a cat", "  ")), r"prompt 2 of 2 is empty"),
  (dict(prompts=("a", "b"), prompt_transition=9), r"prompt_transition=9 is longer than a prompt's segment"),
  (dict(attention="sparse"), r"attention='sparse', expected 'full' or 'dual'"),
  (dict(num_devices=9), r"num_devices=9, but this machine has 8 devices"),
  (dict(dtype="float8"), r"dtype='float8', expected one of"),
  (dict(output="video.avi"), r"output='video.avi': unknown format '.avi'"),
  (dict(output="/dev/null/video.mp4"), r"'/dev/null' is not a directory"),
  (dict(save_latents="latents.npz"), r"save_latents='latents.npz', expected a path ending in .npy"),
  (dict(stop_after=2), r"need state_dir"),
  (
    dict(model="huge"),
    r"model='huge', expected one of modelscope, tiny, tiny_t2v, tiny_turbo, tiny_turbo_v2, videocrafter2, "
    r"videocrafter2_turbo, videocrafter2_turbo_v2, zeroscope_576w, zeroscope_xl",
  ),
  (dict(model="", weights=""), r"no converted weights directory given"),
  (dict(resume="/nonexistent"), r"resume='/nonexistent' is not a state directory"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[",".join(k) for k, _ in BAD])
def test_bad_settings_named(kw, msg):
  with pytest.raises(ValueError, match="(?s)" + msg):
    pipeline.validate(cfg(**kw))


def test_incomplete_or_foreign_weights_dir(tmp_path):
  with pytest.raises(ValueError, match=r"weights=.*no config.json"):
    pipeline.validate(cfg(weights=str(tmp_path), model=""))
  from vinf_jax.config import TINY

  meta = {"format_version": 1, "model": json.loads(TINY.to_json()), "components": ["unet", "vae"]}
  (tmp_path / "config.json").write_text(json.dumps(meta))
  for c in ("unet", "vae"):
    (tmp_path / c).mkdir()
  want = r"config.json lists the components \['unet', 'vae'\], this run needs \['text_encoder', 'tokenizer'\]"
  with pytest.raises(ValueError, match=want):
    pipeline.validate(cfg(weights=str(tmp_path), model=""))
  meta["components"] += ["text_encoder", "tokenizer"]
  (tmp_path / "config.json").write_text(json.dumps(meta))
  (tmp_path / "tokenizer").mkdir()
  # listed but its folder gone (issue 25: the message read "missing ['text_encoder'] (has [..., 'text_encoder', ...])")
  with pytest.raises(ValueError, match=r"lists \['text_encoder'\] but the folder .*text_encoder is not there") as err:
    pipeline.validate(cfg(weights=str(tmp_path), model=""))
  assert "(has" not in str(err.value)
  (tmp_path / "text_encoder").mkdir()
  with pytest.raises(ValueError, match=r"hold the model 'tiny', but model='videocrafter2'"):
    pipeline.validate(cfg(weights=str(tmp_path), model="videocrafter2"))


def _cli(tmp_path, *args):
  cmd = [sys.executable, "-m", "vinf_jax.sample", "--model=tiny", "--frames=16", "--height=64", "--width=64"]
  cmd += ["--window=2", "--num_global=4", f"--output={tmp_path / 'v.mp4'}", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
  "args,msg",
  [
    (["--prompt=a cat", "--sampler=euler"], "sampler='euler'"),
    (["--prompt=a cat", "--frames=20"], "frames=20 is not divisible by the 8 devices"),
    ([], "prompts: none given"),
    (["--prompt=a cat", "--guidance=-2"], "guidance=-2.0"),
    (["--prompt=a cat", "--output=/dev/null/v.mp4"], "'/dev/null' is not a directory"),
    (["--prompt=a cat", "--weights=/nonexistent", "--model="], "weights='/nonexistent'"),
  ],
)
def test_cli_bad_input_exit_code_and_no_file(tmp_path, args, msg):
  p = _cli(tmp_path, *args)
  assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
  assert msg in p.stderr and "error: invalid settings" in p.stderr, p.stderr
  assert "compiled" not in p.stdout and "random weights" not in p.stdout  # nothing loaded or compiled
  assert os.listdir(tmp_path) == []


def test_cli_prompts_on_command_line_replace_the_flagfiles(tmp_path):
  from vinf_jax import sample

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("# a comment\nfirst prompt\n\nsecond prompt\n")
  sample.parse_flags(["x", "--flagfile=configs/demo_tiny.flags"])
  assert sample.config_from_flags().prompts == ("a red panda eating bamboo in a misty forest",)
  sample.parse_flags(["x", "--flagfile=configs/demo_tiny.flags", f"--prompts_file={prompts}", "--frames=64"])
  c = sample.config_from_flags()
  assert c.prompts == ("first prompt", "second prompt") and c.frames == 64 and c.model == "tiny"


def test_cli_two_processes_equal_one(tmp_path):
  """2 processes x 2 CPU devices (--coordinator_address, gloo) write what 1 process x 4 devices writes."""
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  args = ["--model=tiny", "--prompt=a red panda", "--prompt=a snowy mountain", "--frames=16", "--height=64"]
  args += ["--width=64", "--steps=3", "--window=2", "--num_global=4"]

  def launch(local_devices, name, *extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu")
    out = [f"--output={tmp_path / name}.gif", f"--save_latents={tmp_path / name}.npy"]
    cmd = [sys.executable, "-m", "vinf_jax.sample", *args, *out, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  coord = [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  multi = [launch(2, "multi", *coord, f"--process_id={i}") for i in range(2)]
  # the reference: the same flags in this process, on 4 of its devices, while the two processes run
  sample.parse_flags(["sample", *args, "--num_devices=4", f"--output={tmp_path / 'single'}.gif"])
  ref = dataclasses.replace(sample.config_from_flags(), save_latents=f"{tmp_path / 'single'}.npy")
  pipeline.generate(ref, log=quiet)
  logs = []
  for p in multi:
    out, _ = p.communicate(timeout=900)
    logs.append(out)
    assert p.returncode == 0, out[-3000:]
  assert "over 4 device(s) (2 process(es)" in logs[0] and "step   3/3" in logs[0]
  assert "step" not in logs[1] and "wrote" not in logs[1]  # progress and outputs on process 0 only
  a, b = np.load(tmp_path / "multi.npy"), np.load(tmp_path / "single.npy")
  assert a.shape == b.shape == (1, 16, 8, 8, 4)
  assert rel_err(a, b) <= RTOL, rel_err(a, b)
  assert video_io.read_video(str(tmp_path / "multi.gif")).shape == (16, 64, 64, 3)
  assert sorted(os.listdir(tmp_path)) == [
    "multi.gif",
    "multi.json",
    "multi.npy",
    "single.gif",
    "single.json",
    "single.npy",
  ]


def test_compile_only_fills_the_cache_and_writes_nothing(models, tmp_path):
  """compile_only compiles the step and the decoder into the persistent cache, samples nothing, writes
  nothing; the run after it loads both programs from the cache (no new entry) and makes the video."""
  import jax

  cache, out = tmp_path / "cache", tmp_path / "v.mp4"
  session_cache = jax.config.jax_compilation_cache_dir  # the suite's shared cache (conftest)
  models.programs.clear()  # compile here, not reuse the module's programs
  try:
    r = pipeline.generate(
      cfg(compile_only=True, compilation_cache_dir=str(cache), output=str(out)), models=models, log=quiet
    )
    assert r.frames is None and r.latents is None and r.output is None and r.steps_done == 0
    assert not out.exists() and not os.path.exists(video_io.sidecar_path(str(out)))
    tm = r.sidecar["timings_s"]
    assert tm["compile"] > 0 and tm["decode_compile"] > 0 and "denoise" not in tm
    entries = sorted(p.name for p in cache.iterdir())
    assert len([e for e in entries if "step" in e]) == 1, entries  # the guided step's program
    models.programs.clear()
    done = pipeline.generate(cfg(compilation_cache_dir=str(cache), output=str(out)), models=models, log=quiet)
    assert sorted(p.name for p in cache.iterdir()) == entries  # loaded, not compiled again
    assert done.steps_done == 3 and video_io.read_video(str(out)).shape == (16, 64, 64, 3)
  finally:  # the rest of the suite compiles with its shared cache again
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", session_cache)
    compilation_cache.reset_cache()
    models.programs.clear()
