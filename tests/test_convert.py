"""The converter CLI: strictness, safety, atomic output, and a round trip through orbax."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from convert import common, unet_table, videocrafter2
from convert.manifests import MANIFESTS
from convert.torch_io import UnsafeCheckpointError, torch_sources
from tests._checkpoints import original_state_dict
from vinf_jax import checkpoint
from vinf_jax.config import TINY
from vinf_jax.models import unet3d

ROOT = pathlib.Path(__file__).resolve().parents[1]
MANIFEST = MANIFESTS / "videocrafter2_state_dict.json"


@pytest.fixture(scope="module")
def state_dict():
  return original_state_dict(TINY, seed=1)


def _convert(tmp_path, obj, name="model.ckpt", **kw):
  src = tmp_path / name
  torch.save(obj, src)
  out = tmp_path / "out"
  videocrafter2.run(out=str(out), cfg=TINY, dtype=kw.pop("dtype", "float32"), ckpt=str(src), **kw)
  return out


def _leftovers(tmp_path):
  return sorted(p.name for p in tmp_path.iterdir() if p.name != "model.ckpt")


@pytest.mark.parametrize("layout", ["state_dict", "module", "bare"])
def test_three_layouts_convert_and_restore_to_the_same_outputs(tmp_path, state_dict, layout):
  if layout == "state_dict":
    obj = {"state_dict": state_dict}
  elif layout == "module":
    obj = {"module": {"_forward_module." + k: v for k, v in state_dict.items()}}
  else:
    obj = state_dict
  out = _convert(tmp_path, obj)
  cfg, components = checkpoint.read_model_dir(out)
  assert components == ["unet", "vae", "text_encoder", "tokenizer"]
  assert cfg.unet == TINY.unet and cfg.vae == TINY.vae
  restored = checkpoint.load_params(out / "unet", make_abstract=lambda: unet3d.abstract(TINY.unet))
  # the same weights converted in memory, without orbax in between
  targets = common.target_shapes(unet3d.abstract(TINY.unet))
  pre = "model.diffusion_model."
  params = common.convert(
    unet_table.original_table(targets),
    targets,
    torch_sources({k[len(pre) :]: v for k, v in state_dict.items() if k.startswith(pre)}),
    np.float32,
    "unet",
  )
  got = checkpoint.param_tree(restored)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, params)
  if layout != "state_dict":
    return
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 2, 8, 8, 4), dtype=np.float32)
  ctx = rng.standard_normal((1, 77, TINY.unet.context_dim), dtype=np.float32)
  eps = restored(x, np.array([10]), ctx, np.array([24]))
  assert eps.shape == x.shape and np.isfinite(np.asarray(eps)).all()


def test_any_stored_dtype_is_cast(tmp_path):
  sd = original_state_dict(TINY, seed=2, dtype=torch.float16)
  out = _convert(tmp_path, {"state_dict": sd}, dtype="bfloat16")
  restored = checkpoint.load_params(out / "unet", make_abstract=lambda: unet3d.abstract(TINY.unet))
  leaves = jax.tree.leaves(checkpoint.param_tree(restored))
  assert {str(a.dtype) for a in leaves} == {"float32"}  # the abstract model's dtype decides
  w = sd["model.diffusion_model.input_blocks.0.0.weight"].float().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_allclose(np.asarray(restored.input_blocks[0][0].kernel[...]), w, rtol=1e-2)


def _expect_failure(tmp_path, sd, *patterns):
  with pytest.raises((common.ConversionError, ValueError)) as e:
    _convert(tmp_path, {"state_dict": sd})
  for p in patterns:
    assert p in str(e.value), str(e.value)
  assert _leftovers(tmp_path) == [], "a failed conversion left files behind"
  return str(e.value)


def test_missing_key(tmp_path, state_dict):
  sd = dict(state_dict)
  del sd["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"]
  _expect_failure(tmp_path, sd, "1 missing source keys", "middle_block.1.transformer_blocks.0.attn2.to_k.weight")


def test_unexpected_key(tmp_path, state_dict):
  sd = dict(state_dict)
  sd["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(3)
  sd["model_ema.decay"] = torch.zeros(())
  msg = _expect_failure(tmp_path, sd, "model_ema.decay")
  assert "unexpected" in msg


def test_wrong_shape(tmp_path, state_dict):
  sd = dict(state_dict)
  k = "model.diffusion_model.output_blocks.4.0.temopral_conv.conv2.3.weight"
  sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1], 5, 1, 1)
  _expect_failure(tmp_path, sd, "1 mis-shaped tensors", "output_blocks.4.0.temopral_conv.conv2.3.weight")


def test_schedule_buffers_are_checked(tmp_path, state_dict):
  sd = dict(state_dict)
  sd["alphas_cumprod"] = sd["alphas_cumprod"] * 1.001
  _expect_failure(tmp_path, sd, "alphas_cumprod")


class _Evil:
  def __reduce__(self):
    return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
  _Evil.marker = str(tmp_path / "pwned")
  src = tmp_path / "model.ckpt"
  torch.save({"state_dict": {"x": _Evil()}}, src, pickle_protocol=2)
  with pytest.raises(UnsafeCheckpointError, match="refused"):
    videocrafter2.run(out=str(tmp_path / "out"), cfg=TINY, dtype="float32", ckpt=str(src))
  assert not os.path.exists(_Evil.marker)
  assert _leftovers(tmp_path) == []
  # and through the command line: non-zero exit, the message, no output
  r = subprocess.run(
    [sys.executable, "-m", "convert.videocrafter2", f"--ckpt={src}", f"--out={tmp_path / 'o2'}", "--model=tiny"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert r.returncode == 1 and "refused" in r.stderr, r.stderr
  assert not os.path.exists(_Evil.marker) and _leftovers(tmp_path) == []


def test_existing_output_is_not_overwritten(tmp_path, state_dict):
  (tmp_path / "out").mkdir()
  with pytest.raises(ValueError, match="already exists"):
    _convert(tmp_path, {"state_dict": state_dict})


def test_check_manifest_cli(tmp_path):
  """The manifest the repository carries, by its name and by a path (from another directory: it is found
  beside the converter, not relative to the working directory)."""
  for value in ("videocrafter2", str(MANIFEST)):
    r = subprocess.run(
      [sys.executable, "-m", "convert.videocrafter2", f"--check_manifest={value}"],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "mapped 2039/2039 tensors", r.stdout
    assert any(line.startswith("unet") and "1484 tensors" in line for line in lines)


def test_the_tests_need_nothing_beside_the_repository():
  """What the tests read lies inside the repository (a fresh clone has nothing beside it)."""
  assert MANIFEST.is_relative_to(ROOT) and MANIFEST.is_file()
  outside = ("parents[" + "2]", "ROOT." + "parent", '"shared" / ' + '"reference"')  # not this test's own text
  for path in sorted((ROOT / "tests").glob("*.py")):
    text = path.read_text(encoding="utf-8")
    assert not [s for s in outside if s in text], f"{path.name} reads outside the repository"


def test_check_manifest_rejects_a_bad_manifest(tmp_path):
  import json

  m = json.loads(MANIFEST.read_text())
  m["tensors"]["model.diffusion_model.out.2.weight"] = [4, 320, 3, 1]
  bad = tmp_path / "m.json"
  bad.write_text(json.dumps(m))
  r = subprocess.run(
    [sys.executable, "-m", "convert.videocrafter2", f"--check_manifest={bad}"], capture_output=True, text=True, cwd=ROOT
  )
  assert r.returncode == 1 and "out.2.weight" in r.stderr, r.stderr


def test_diffusers_unet_file_converts_to_the_same_weights(tmp_path):
  """--diffusers_unet with a safetensors file: the same parameters as the original-key path."""
  from safetensors.torch import save_file

  from tests._unet_reference import ReferenceUNet

  ref = ReferenceUNet(TINY.unet, seed=5)
  sd = ref.state_dict_for_conversion()
  save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  out = tmp_path / "out"
  videocrafter2.run(out=str(out), cfg=TINY, dtype="float32", diffusers_unet=str(tmp_path))
  cfg, components = checkpoint.read_model_dir(out, need=("unet", "tokenizer"))
  assert components == ["unet", "tokenizer"]
  with pytest.raises(FileNotFoundError, match="incomplete"):
    checkpoint.read_model_dir(out)
  restored = checkpoint.load_params(out / "unet", make_abstract=lambda: unet3d.abstract(TINY.unet))
  targets = common.target_shapes(unet3d.abstract(TINY.unet))
  want = common.convert(unet_table.diffusers_table(targets, TINY.unet), targets, torch_sources(sd), np.float32, "u")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), checkpoint.param_tree(restored), want)


# ---------------------------------------------------------------------------------------------
# Bad inputs (issue 16): refused in one line, before anything is converted, nothing left behind.

UNET_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.int64, torch.complex64])
def test_non_float_tensors_are_refused_by_key(tmp_path, state_dict, dtype):
  sd = dict(state_dict)
  sd[UNET_KEY] = torch.ones(sd[UNET_KEY].shape, dtype=dtype)
  _expect_failure(tmp_path, sd, "weights must be floating point", f"{UNET_KEY[len('model.diffusion_model.') :]} (")


def test_nan_inf_and_overflow_are_refused_by_key(tmp_path, state_dict):
  sd = dict(state_dict)
  nan_key, inf_key = UNET_KEY, "model.diffusion_model.out.2.weight"
  sd[nan_key] = sd[nan_key].clone()
  sd[nan_key].view(-1)[3] = float("nan")
  sd[inf_key] = sd[inf_key].clone()
  sd[inf_key].view(-1)[0] = float("inf")
  msg = _expect_failure(tmp_path, sd, "2 tensors holding NaN or inf", "in_layers.2.weight: 1 of", "out.2.weight: 1 of")
  assert "the weights must be finite" in msg
  big = dict(state_dict)
  big[inf_key] = big[inf_key].clone()
  big[inf_key].view(-1)[0] = 1e6  # finite in float32, inf in float16
  with pytest.raises(common.ConversionError, match=r"overflow float16 .*\n.*out.2.weight: max \|value\| 1e\+06"):
    _convert(tmp_path, {"state_dict": big}, dtype="float16")
  assert _leftovers(tmp_path) == []


def _bad_file(tmp_path, kind, state_dict):
  path = tmp_path / "model.ckpt"
  if kind == "empty":
    path.write_bytes(b"")
  elif kind == "text":
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 13\n")
  elif kind == "random":
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  elif kind in ("truncated_zip", "truncated_pickle"):
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": state_dict}, full, _use_new_zipfile_serialization=kind == "truncated_zip")
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
  elif kind == "zip_not_torch":
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
      z.writestr("readme.txt", "hello")
  elif kind == "truncated_safetensors":
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.ones(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
  elif kind == "tensor_not_dict":
    torch.save(torch.zeros(3), path)
  return path


BAD_FILES = {
  "empty": "is empty (0 bytes)",
  "text": "is a text file, not a PyTorch or safetensors checkpoint",
  "random": "is neither a PyTorch checkpoint (zip or pickle) nor a safetensors file",
  "truncated_zip": "is a truncated zip archive",
  "truncated_pickle": "cannot be read (truncated or damaged?)",
  "zip_not_torch": "is a zip archive but not a PyTorch checkpoint",
  "truncated_safetensors": "is a truncated safetensors file",
  "tensor_not_dict": "checkpoint holds a Tensor, expected a dict of tensors",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_checkpoint_files_in_one_line(tmp_path, state_dict, kind, capsys):
  path = _bad_file(tmp_path, kind, state_dict)
  out = tmp_path / "new" / "out"
  with pytest.raises((common.ConversionError, ValueError)) as e:
    videocrafter2.run(out=str(out), cfg=TINY, dtype="float32", ckpt=str(path))
  msg = str(e.value)
  assert BAD_FILES[kind] in msg and str(path) in msg and "\n" not in msg, msg
  assert not (tmp_path / "new").exists()  # the parent folder made for --out is gone again
  if kind not in ("truncated_pickle", "tensor_not_dict"):  # found by looking at the file, before reading it
    assert "reading" not in capsys.readouterr().out


def test_every_input_is_checked_before_converting(tmp_path, state_dict, capsys):
  src = tmp_path / "model.ckpt"
  torch.save({"state_dict": state_dict}, src)
  not_gzip = tmp_path / "bpe.txt.gz"
  not_gzip.write_text("not gzip")
  cases = [
    (dict(tokenizer_spec=str(not_gzip)), "--tokenizer .*bpe.txt.gz is not open_clip's gzip-compressed BPE file"),
    (dict(tokenizer_spec=str(tmp_path / "nope.gz")), "--tokenizer .*nope.gz: no such file"),
    (dict(out="/proc/x/out"), "--out='/proc/x/out': cannot write in '/proc/x'"),
  ]
  for kw, msg in cases:
    out = kw.pop("out", str(tmp_path / "out"))
    with pytest.raises((common.ConversionError, ValueError), match=msg):
      videocrafter2.run(out=out, cfg=TINY, dtype="float32", ckpt=str(src), **kw)
    assert "reading" not in capsys.readouterr().out  # refused before the checkpoint was read
  assert _leftovers(tmp_path) == ["bpe.txt.gz"]


def test_failed_conversion_removes_the_parent_folders_it_made(tmp_path, state_dict):
  sd = dict(state_dict)
  del sd[UNET_KEY]
  src = tmp_path / "model.ckpt"
  torch.save({"state_dict": sd}, src)
  with pytest.raises(common.ConversionError, match="1 missing source keys"):
    videocrafter2.run(out=str(tmp_path / "a" / "b" / "out"), cfg=TINY, dtype="float32", ckpt=str(src))
  assert _leftovers(tmp_path) == []


def test_cli_help_and_a_quiet_conversion(tmp_path, state_dict):
  def run(args):
    return subprocess.run(
      [sys.executable, "-m", "convert.videocrafter2", *args], capture_output=True, text=True, cwd=ROOT
    )

  r = run(["--help"])
  assert r.returncode == 0 and "--ckpt" in r.stdout and "--tokenizer" in r.stdout, r.stderr
  src = tmp_path / "model.ckpt"
  torch.save({"state_dict": state_dict}, src)
  r = run([f"--ckpt={src}", f"--out={tmp_path / 'out'}", "--model=tiny"])
  assert r.returncode == 0, r.stderr
  assert "wrote" in r.stdout and len(r.stderr) < 2000, r.stderr  # no INFO lines of orbax
  # and a bad file through the command line: exit 1, one line, no traceback
  bad = tmp_path / "empty.ckpt"
  bad.write_bytes(b"")
  r = run([f"--ckpt={bad}", f"--out={tmp_path / 'o2'}", "--model=tiny"])
  assert r.returncode == 1 and r.stderr.strip() == f"error: --ckpt {bad} is empty (0 bytes)", r.stderr
