"""The Colab notebook, executed headless on CPU with ``TINY = True``: every cell runs, the video is written.

The kernel is ipykernel's own "python3" (``pip install -e ".[test]"`` brings it; jupyter_client runs it with
this interpreter), started in an empty directory with this process's environment: the 8 fake CPU devices
of conftest.py, ``JAX_PLATFORMS=cpu`` and this checkout first on the path.
"""

import json
import os
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient

from vinf_jax import video_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "vinf_jax_colab.ipynb")
CELL_TIMEOUT_S = 300  # the generation cell takes about a minute on 2 CPU cores


def read_notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
  return cells[0]


def set_parameter(source: str, name: str, value) -> str:
  """``source`` with the line ``NAME = ...`` replaced by ``NAME = repr(value)`` (exactly one such line)."""
  new, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.M)
  assert n == 1, f"the parameters cell has {n} lines assigning {name}"
  return new


def test_notebook_is_valid_and_clean():
  nb = read_notebook()
  nbformat.validate(nb)
  assert nb.nbformat == 4
  first = nb.cells[0]
  assert first.cell_type == "markdown" and first.source.startswith("# ")
  badge = "https://colab.research.google.com/github/vinf-jax/vinf_jax/blob/main/colab/vinf_jax_colab.ipynb"
  assert badge in first.source and "colab-badge.svg" in first.source
  for c in nb.cells:
    if c.cell_type == "code":
      assert c.outputs == [] and c.execution_count is None, f"stored outputs in:\n{c.source}"
  params = parameters_cell(nb).source
  for name in (
    "TINY",
    "PROMPTS",
    "FRAMES",
    "STEPS",
    "SEED",
    "PROMPT_TRANSITION",
    "FRAME_CHUNK",
    "OUTPUT",
    "WEIGHTS_DIR",
  ):
    assert re.search(rf"^{name} = ", params, flags=re.M), f"parameter {name} missing"
  assert re.search(r"^TINY = False$", params, flags=re.M)  # the real model by default


def test_notebook_runs_tiny_on_cpu(tmp_path):
  nb = read_notebook()
  cell = parameters_cell(nb)
  out = tmp_path / "video.mp4"
  cell.source = set_parameter(set_parameter(cell.source, "TINY", True), "OUTPUT", str(out))
  work = tmp_path / "work"  # the kernel's working directory: TINY must neither download nor write here
  work.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  client = NotebookClient(
    nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(work)}}
  )
  t = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError (with the traceback) if a cell fails
  print(f"notebook ran in {time.perf_counter() - t:.1f} s")

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  print(text)
  assert "not running in Colab: skipping the install" in text
  assert "TINY: random weights, nothing to download" in text
  assert "CpuDevice" in text and "dtype float32" in text
  assert "compiled the guided step" in text
  for i in range(1, 11):
    assert f"step {i:3d}/10" in text, f"no progress line for step {i}"
  assert "wrote " + str(out) in text

  video = video_io.read_video(str(out))
  assert video.shape == (32, 128, 128, 3), video.shape
  assert video.std() > 5  # noise-like, not black
  side = json.loads((tmp_path / "video.json").read_text())
  assert side["settings"]["model"] == "tiny" and side["settings"]["steps"] == 10
  assert len(side["prompts"]) == len(side["settings"]["prompts"]) >= 1

  shown = [o for o in outputs if o.output_type == "execute_result" and "text/html" in o.data]
  assert len(shown) == 1 and "data:video/mp4;base64," in shown[0].data["text/html"]
  assert os.listdir(work) == [], os.listdir(work)


if __name__ == "__main__":
  raise SystemExit(pytest.main([__file__, "-q", "-s"]))
