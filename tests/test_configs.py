"""Every flagfile in configs/ starts with the command that runs it, parses, and passes validation.

The flagfiles that need converted weights are validated with random weights of the same model (their
``--weights`` directory does not exist here); every other setting is checked as written, on 1, 2, 4 and
8 devices where the frame count allows.
"""

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.flags")))


def test_the_four_flagfiles_exist():
  names = {os.path.basename(f) for f in FLAGFILES}
  assert {"demo_tiny.flags", "videocrafter2_16.flags", "long_video.flags", "multi_prompt.flags"} <= names
  assert {"turbo_16.flags", "turbo_long_video.flags", "demo_turbo_tiny.flags"} <= names


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_parses_and_validates(path, monkeypatch):
  import dataclasses

  from vinf_jax import pipeline, sample
  from vinf_jax.pipeline import memory

  # the memory plan as on an 80 GB GPU: the full-size flagfiles are for GPUs (a CPU device here has a few GiB)
  monkeypatch.setattr(memory, "device_limit", lambda gib=0.0: (80 * memory.GiB, "an 80 GB GPU (test)"))

  rel = os.path.relpath(path, ROOT)
  first = open(path).readline().strip()
  assert first == f"# python -m vinf_jax.sample --flagfile {rel}", first
  sample.parse_flags(["sample", f"--flagfile={path}"])
  cfg = sample.config_from_flags()
  assert cfg.prompts, "a flagfile names its prompts"
  if cfg.weights:  # not converted here: same settings, random weights of the model
    model = {
      "weights/videocrafter2": "videocrafter2",
      "weights/t2v_turbo": "videocrafter2_turbo",
      "weights/t2v_turbo_v2": "videocrafter2_turbo_v2",
      "weights/zeroscope_576w": "zeroscope_576w",
      "weights/modelscope": "modelscope",
    }[cfg.weights]
    cfg = dataclasses.replace(cfg, weights="", model=model)
  for d in (1, 2, 4, 8) if cfg.num_devices == 0 else (cfg.num_devices,):
    if cfg.frames % d == 0 and cfg.frames // d >= max(4, cfg.window if cfg.attention == "dual" else 0):
      pipeline.validate(dataclasses.replace(cfg, num_devices=d, output=""))


def test_readme_commands_name_real_flagfiles_and_flags():
  """Every `python -m vinf_jax.sample` line of the README names an existing flagfile and known flags."""
  import re

  from vinf_jax import sample

  readme = open(os.path.join(ROOT, "README.md")).read()
  lines = [ln for ln in readme.splitlines() if "python -m vinf_jax.sample" in ln and ln.strip().startswith("python")]
  assert len(lines) >= 4
  for ln in lines:
    for path in re.findall(r"--flagfile[ =](\S+)", ln):
      assert os.path.isfile(os.path.join(ROOT, path)), ln
    for name in re.findall(r"--([a-z_]+)", ln):
      assert name in ("flagfile", "helpfull") or name in sample.F, (name, ln)


def test_readme_results_block_is_generated_from_results_md():
  from benchmarks import results_table

  readme = open(os.path.join(ROOT, "README.md")).read()
  block = readme.split(results_table.BEGIN)[1].split(results_table.END)[0]
  assert block.strip() == results_table.render().strip()


def test_helpfull_lists_every_flag():
  import subprocess
  import sys

  from vinf_jax import sample

  p = subprocess.run([sys.executable, "-m", "vinf_jax.sample", "--helpfull"], cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 0, p.stderr
  for name in sample.F:
    assert f"--{name}" in p.stdout or f"--[no]{name}" in p.stdout, name
  # plain text (no reST markup of the module docstring), and --flagfile itself
  assert p.stdout.startswith("Make a long video: python -m vinf_jax.sample --flagfile")
  assert "``" not in p.stdout and ":class:" not in p.stdout and ":func:" not in p.stdout
  assert "--flagfile:" in p.stdout
