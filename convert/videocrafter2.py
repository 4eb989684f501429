r"""Convert VideoCrafter2 weights from PyTorch into a vinf_jax model directory.

  # the original checkpoint (UNet, VAE, text encoder, schedule buffers; tokenizer from open_clip)
  python -m convert.videocrafter2 --ckpt model.ckpt --out weights/videocrafter2
  # T2V-Turbo (VC2): the merged v1 checkpoint; or v1's LoRA list on model.ckpt; or v2's UNet with model.ckpt
  python -m convert.videocrafter2 --ckpt t2v_turbo_vc2.pt --out weights/t2v_turbo
  python -m convert.videocrafter2 --ckpt model.ckpt --turbo_lora unet_lora.pt --out weights/t2v_turbo_lora
  python -m convert.videocrafter2 --ckpt model.ckpt --turbo_unet unet_mg.pt --out weights/t2v_turbo_v2
  # the diffusers-format UNet port (+ optionally a diffusers VAE and a transformers CLIPTextModel)
  python -m convert.videocrafter2 --diffusers_unet unet/diffusion_pytorch_model.safetensors \
      [--diffusers_vae vae/diffusion_pytorch_model.safetensors] [--clip_text_model text_encoder/model.safetensors] \
      [--tokenizer bpe_simple_vocab_16e6.txt.gz] --out weights/vc2_diffusers
  # a diffusers text-to-video pipeline folder (ModelScope, ZeroScope, ...), or its snapshot in the HF cache
  python -m convert.videocrafter2 --diffusers PIPELINE_DIR --out weights/NAME
  python -m convert.videocrafter2 --hub cerspense/zeroscope_v2_576w --out weights/zeroscope_576w
  # map the published key/shape manifest onto the abstract full-size model (no weights needed)
  python -m convert.videocrafter2 --check_manifest=videocrafter2  # the manifest carried in convert/manifests/

The output directory holds ``config.json`` (model config + which components are present), one orbax
directory per component (``unet/``, ``vae/``, ``text_encoder/``) and ``tokenizer/`` (vocab.json,
merges.txt). It is written under a temporary name and renamed at the end: a failed conversion
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping

import numpy as np
from absl import app, flags

from convert import common, manifests, text_table, turbo, unet_table, vae_table
from convert.common import ConversionError, SourceTensor
from convert.torch_io import UnsafeCheckpointError, load_sources, load_tensor_list, weights_file_kind
from vinf_jax import checkpoint, sampling, tokenizer, video_io
from vinf_jax.config import ModelConfig, preset, to_dtype
from vinf_jax.models import unet3d

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
FORMAT_VERSION = 1

_FLAGS = {
  "ckpt": flags.DEFINE_string(
    "ckpt",
    None,
    "Original LatentDiffusion checkpoint (model.ckpt): "
    "{'state_dict': ...}, {'module': ...} (DeepSpeed) or a bare state dict.",
  ),
  "turbo_lora": flags.DEFINE_string(
    "turbo_lora",
    None,
    "T2V-Turbo v1's unet_lora.pt (a list of LoRA up/down tensors), merged into --ckpt's UNet in float32.",
  ),
  "turbo_unet": flags.DEFINE_string(
    "turbo_unet",
    None,
    "T2V-Turbo-v2's UNet state dict (unet_mg.pt / unet_no_mg.pt, no prefix): the UNet, with --ckpt's VAE and text.",
  ),
  "diffusers_unet": flags.DEFINE_string(
    "diffusers_unet",
    None,
    "diffusers-format UNet weights (.safetensors or .bin), keys as UNet3DConditionModel + fps_embedding.",
  ),
  "diffusers": flags.DEFINE_string(
    "diffusers",
    None,
    "A diffusers TextToVideoSDPipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
    "scheduler/): every component and the scheduler's schedule (convert/diffusers_t2v.py).",
  ),
  "hub": flags.DEFINE_string(
    "hub", None, "A Hugging Face repo id whose pipeline snapshot is in the local cache (offline), as --diffusers."
  ),
  "variant": flags.DEFINE_string(
    "variant", None, "With --diffusers/--hub: the weights variant to read (e.g. fp16); default: the plain files."
  ),
  "diffusers_vae": flags.DEFINE_string(
    "diffusers_vae", None, "diffusers AutoencoderKL weights (with --diffusers_unet)."
  ),
  "clip_text_model": flags.DEFINE_string(
    "clip_text_model",
    None,
    "transformers CLIPTextModel weights (with --diffusers_unet; 23 layers as in the zeroscope repos).",
  ),
  "tokenizer": flags.DEFINE_string(
    "tokenizer",
    None,
    "open_clip's bpe_simple_vocab_16e6.txt.gz, or a directory "
    "with vocab.json + merges.txt. Default: the installed open_clip package's file.",
  ),
  "out": flags.DEFINE_string("out", None, "Output directory (must not exist)."),
  "model": flags.DEFINE_enum("model", "videocrafter2", ["videocrafter2", "tiny"], "Model preset to convert into."),
  "dtype": flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16", "float16"],
    "dtype the weights are stored in (every tensor is cast, whatever it was stored as).",
  ),
  "check_manifest": flags.DEFINE_string(
    "check_manifest",
    None,
    "Only map a key/shape manifest JSON onto the abstract model: a path, or 'videocrafter2' for the one carried "
    "in convert/manifests/ (VideoCrafter2's model.ckpt, 2039 tensors).",
  ),
}


# ------------------------------------------------------------------------------------------------
# The components, each: sources (keys relative to its prefix) -> nested params.


def convert_unet(sources: Mapping[str, SourceTensor], cfg: ModelConfig, layout: str, dtype) -> dict:
  targets = common.target_shapes(unet3d.abstract(cfg.unet))
  table = unet_table.original_table(targets) if layout == "original" else unet_table.diffusers_table(targets, cfg.unet)
  return common.convert(table, targets, sources, dtype, f"UNet ({layout} keys)")


def split_original(sd: Mapping[str, SourceTensor]) -> dict[str, dict[str, SourceTensor]]:
  """Split a whole LatentDiffusion state dict by component; anything else is an error."""
  parts: dict[str, dict[str, SourceTensor]] = {"unet": {}, "vae": {}, "text": {}, "buffers": {}}
  unknown = []
  buffers = set(sampling.schedule())
  for k, v in sd.items():
    if k.startswith(UNET_PREFIX):
      parts["unet"][k[len(UNET_PREFIX) :]] = v
    elif k.startswith(VAE_PREFIX):
      parts["vae"][k[len(VAE_PREFIX) :]] = v
    elif k.startswith(TEXT_PREFIX):
      parts["text"][k] = v
    elif k in buffers:
      parts["buffers"][k] = v
    else:
      unknown.append(k)
  if unknown:
    raise ConversionError(
      common._listing("unexpected keys outside the UNet, VAE, text encoder and schedule", sorted(unknown))
    )
  return parts


def check_buffers(sources: Mapping[str, SourceTensor]) -> int:
  """The checkpoint's schedule buffers must equal the ones the samplers compute (within 1e-6).

  A buffer stored in half precision is compared after rounding the computed one to that precision:
  the check is then as strict as the file can be.
  """
  stored = {}
  ref = sampling.schedule()
  for k, v in sources.items():
    x = np.asarray(v.load(), np.float64)
    if v.stored_dtype != "float32" and k in ref and x.shape == ref[k].shape:
      # where the stored value is exactly the rounding of the computed one, it agrees
      rounded = np.asarray(ref[k], np.float32).astype(to_dtype(v.stored_dtype)).astype(np.float64)
      x = np.where(x == rounded, np.asarray(ref[k], np.float64), x)
    stored[k] = x
  sampling.check_schedule_buffers(stored)
  return len(sources)


def tokenizer_files(spec: str | None, out_dir: str) -> None:
  """Write vocab.json + merges.txt into ``out_dir`` from a bpe .gz, a directory, or open_clip."""
  spec = spec or tokenizer.open_clip_bpe_path()
  if spec is None:
    raise ConversionError(
      "no tokenizer files: pass --tokenizer (open_clip's bpe_simple_vocab_16e6.txt.gz, "
      "or a directory with vocab.json and merges.txt), or `pip install --no-deps "
      "open_clip_torch` so that its file is found"
    )
  os.makedirs(out_dir)
  if os.path.isdir(spec):
    for name in ("vocab.json", "merges.txt"):
      if not os.path.isfile(os.path.join(spec, name)):
        raise ConversionError(f"--tokenizer directory {spec} has no {name}")
      shutil.copy(os.path.join(spec, name), out_dir)
  elif os.path.isfile(spec):
    try:
      tokenizer.write_vocab_files(spec, out_dir)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
      raise ConversionError(
        f"--tokenizer {spec} is not open_clip's gzip-compressed BPE file (bpe_simple_vocab_16e6.txt.gz): {e}"
      ) from None
    except ValueError as e:
      raise ConversionError(f"--tokenizer {e}") from None
  else:
    raise ConversionError(f"--tokenizer {spec}: no such file or directory")
  try:
    tokenizer.load_tokenizer(out_dir)(["a tokenizer check"])  # fail here, not at sampling time
  except Exception as e:  # transformers raises many kinds for malformed vocab.json / merges.txt
    raise ConversionError(f"--tokenizer {spec}: the vocabulary does not load: {str(e).splitlines()[0]}") from None


def check_inputs(
  out: str,
  ckpt: str | None = None,
  diffusers_unet: str | None = None,
  diffusers_vae: str | None = None,
  clip_text_model: str | None = None,
  tokenizer_spec: str | None = None,
  turbo_lora: str | None = None,
  turbo_unet: str | None = None,
) -> None:
  """Check every input before anything is converted: each weights file exists and is a whole PyTorch or
  safetensors file (not empty, text, truncated), the tokenizer files load, and ``out`` can be created.
  Raises ConversionError / ValueError in one line naming the flag and the file."""
  video_io.check_writable(out, "--out", directory=True)
  for flag, path in (
    ("--ckpt", ckpt),
    ("--diffusers_unet", diffusers_unet),
    ("--diffusers_vae", diffusers_vae),
    ("--clip_text_model", clip_text_model),
    ("--turbo_lora", turbo_lora),
    ("--turbo_unet", turbo_unet),
  ):
    if path is None:
      continue
    if not os.path.exists(path):
      raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    weights_file_kind(path if flag in ("--ckpt", "--turbo_lora", "--turbo_unet") else _weights_file(path), flag)
  with tempfile.TemporaryDirectory(prefix="vinf_jax-tokenizer-check-") as d:
    tokenizer_files(tokenizer_spec, os.path.join(d, "tokenizer"))


@contextlib.contextmanager
def staged_output(out: str):
  """A temporary directory beside ``out``, renamed to ``out`` when the block ends without an error; on any error
  or interrupt it and the parent folders made for it are removed: a converted directory is whole or absent."""
  parent = os.path.dirname(out)
  created = video_io.make_dirs(parent)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    yield tmp
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    video_io.remove_dirs(created)
    raise


def write_meta(tmp: str, meta: dict) -> None:
  """The converted directory's ``config.json``."""
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(meta, f, indent=1)


def _save(tmp: str, name: str, params: dict) -> None:
  t0 = time.perf_counter()
  checkpoint.save_params(os.path.join(tmp, name), params)
  print(f"  {name}: saved in {time.perf_counter() - t0:.1f}s")


def run(
  *,
  out: str,
  cfg: ModelConfig,
  dtype: str,
  ckpt: str | None = None,
  diffusers_unet: str | None = None,
  diffusers_vae: str | None = None,
  clip_text_model: str | None = None,
  tokenizer_spec: str | None = None,
  turbo_lora: str | None = None,
  turbo_unet: str | None = None,
) -> None:
  """Convert and write ``out`` atomically (library entry point of the CLI; raises on any mismatch)."""
  if (ckpt is None) == (diffusers_unet is None):
    raise ValueError("give exactly one of --ckpt and --diffusers_unet")
  if (turbo_lora or turbo_unet) and ckpt is None:
    raise ValueError("--turbo_lora / --turbo_unet go with --ckpt model.ckpt (VideoCrafter2's, for the rest)")
  if turbo_lora and turbo_unet:
    raise ValueError("give at most one of --turbo_lora (v1) and --turbo_unet (v2)")
  if ckpt is not None and (diffusers_vae or clip_text_model):
    raise ValueError("--diffusers_vae/--clip_text_model go with --diffusers_unet; --ckpt already holds them")
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ValueError(f"--out {out} already exists; choose a new directory")
  check_inputs(out, ckpt, diffusers_unet, diffusers_vae, clip_text_model, tokenizer_spec, turbo_lora, turbo_unet)
  np_dtype = to_dtype(dtype)
  cfg = cfg.with_dtype("float32", dtype)
  components = []
  with staged_output(out) as tmp:
    if ckpt is not None:
      print(f"reading {ckpt}")
      parts = split_original(load_sources(ckpt))
      print(f"  schedule buffers: {check_buffers(parts['buffers'])} checked against the sampler's schedule")
      unet_src, turbo_meta = turbo_unet_sources(parts["unet"], cfg, turbo_lora=turbo_lora, turbo_unet=turbo_unet)
      cfg = turbo.detect(cfg, unet_src)
      if cfg.unet.time_cond_proj_dim:
        print(f"  UNet: T2V-Turbo ({cfg.name})")
      _save(tmp, "unet", convert_unet(unet_src, cfg, "original", np_dtype))
      gc.collect()
      _save(tmp, "vae", vae_table.convert_vae(parts["vae"], cfg.vae, layout="ldm"))
      gc.collect()
      text_src = text_table.stage_sources(parts["text"])
      _save(tmp, "text_encoder", text_table.convert_text(text_src, cfg.text, layout="open_clip"))
      components = ["unet", "vae", "text_encoder"]
    else:
      print(f"reading {diffusers_unet}")
      _save(tmp, "unet", convert_unet(load_sources(_weights_file(diffusers_unet)), cfg, "diffusers", np_dtype))
      components = ["unet"]
      if diffusers_vae:
        _save(tmp, "vae", vae_table.convert_vae(load_sources(_weights_file(diffusers_vae)), cfg.vae))
        components.append("vae")
      if clip_text_model:
        src = load_sources(_weights_file(clip_text_model))
        text_cfg = text_table.config_for_sources(cfg.text, src, "hf")
        cfg = dataclasses.replace(cfg, text=text_cfg)
        _save(tmp, "text_encoder", text_table.convert_text(src, text_cfg, layout="hf"))
        components.append("text_encoder")
    tokenizer_files(tokenizer_spec, os.path.join(tmp, "tokenizer"))
    components.append("tokenizer")
    meta = {
      "format_version": FORMAT_VERSION,
      "model": json.loads(cfg.to_json()),
      "components": components,
      "stored_dtype": dtype,
      "source": os.path.basename(ckpt or diffusers_unet),
    }
    if ckpt is not None and turbo_meta:
      meta["turbo"] = turbo_meta
    write_meta(tmp, meta)
  print(f"wrote {out}: {', '.join(components)}")


def turbo_unet_sources(
  unet: dict, cfg: ModelConfig, *, turbo_lora: str | None, turbo_unet: str | None
) -> tuple[dict, dict | None]:
  """The UNet's sources: --ckpt's own (VideoCrafter2, or a merged T2V-Turbo checkpoint), v2's UNet file
  instead of them, or them with v1's LoRA list merged in; and what to record about it (None: nothing)."""
  if turbo_unet:
    print(f"reading {turbo_unet} (the UNet; --ckpt gives the VAE, the text encoder and the schedule)")
    src = turbo.strip_unet_prefix(load_sources(turbo_unet), UNET_PREFIX)
    return src, {"layout": "v2 UNet state dict", "unet": os.path.basename(turbo_unet)}
  if turbo_lora:
    print(f"reading {turbo_lora} (T2V-Turbo v1 LoRA list)")
    src, info = turbo.merge_lora(unet, load_tensor_list(turbo_lora), model_channels=cfg.unet.model_channels)
    print(
      f"  {info.pairs} LoRA pairs merged in float32; time_cond_proj's base drawn from seed {turbo.TIME_COND_BASE_SEED}"
    )
    return src, {"layout": "v1 LoRA list", "lora": os.path.basename(turbo_lora), **dataclasses.asdict(info)}
  if turbo.TIME_COND in unet:
    return unet, {"layout": "v1 merged checkpoint"}
  return unet, None


def _weights_file(path: str) -> str:
  """A file, or a diffusers/transformers folder holding one of the usual weight file names."""
  if os.path.isdir(path):
    for name in (
      "diffusion_pytorch_model.safetensors",
      "model.safetensors",
      "diffusion_pytorch_model.bin",
      "pytorch_model.bin",
    ):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"{path} holds no diffusion_pytorch_model/model .safetensors or .bin")
  return path


def check_manifest(path: str) -> int:
  """Map every tensor of a manifest onto the abstract full-size model; print one line per component."""
  manifest = json.loads(open(path).read())
  shapes = {k: tuple(v) for k, v in manifest["tensors"].items()}
  unet = {k[len(UNET_PREFIX) :]: s for k, s in shapes.items() if k.startswith(UNET_PREFIX)}
  cfg = turbo.detect(preset("videocrafter2"), {k: common.SourceTensor(tuple(s), lambda: None) for k, s in unet.items()})
  targets = common.target_shapes(unet3d.abstract(cfg.unet))
  common.check_table(unet_table.original_table(targets), targets, unet, "UNet")
  print(f"unet ({UNET_PREFIX}*, {cfg.name}): {len(unet)} tensors onto {len(targets)} parameters")
  n_vae = vae_table.check_manifest_vae(shapes)
  print(f"vae ({VAE_PREFIX}*): {n_vae} tensors")
  n_text = text_table.check_manifest_text(shapes, cfg.text)
  print(f"text encoder ({TEXT_PREFIX}*): {n_text} tensors ({', '.join(text_table.ORIGINAL_UNUSED)} unused)")
  ref = sampling.schedule()
  bufs = {k: s for k, s in shapes.items() if "." not in k}
  bad = sorted(k for k in bufs if k not in ref or tuple(ref[k].shape) != tuple(bufs[k]))
  missing = sorted(k for k in ref if k not in bufs)
  if bad or missing:
    raise ConversionError(f"schedule buffers: unexpected or mis-shaped {bad}, missing {missing}")
  print(f"schedule buffers: {len(bufs)} tensors")
  mapped = len(unet) + n_vae + n_text + len(bufs)
  total = len(shapes)
  print(f"mapped {mapped}/{total} tensors")
  if mapped != total:
    raise ConversionError(f"{total - mapped} tensors of the manifest belong to no component")
  return mapped


def main(argv):
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs ~18 KB of INFO lines per conversion
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = {k: v.value for k, v in _FLAGS.items()}
  try:
    if f["check_manifest"]:
      check_manifest(manifests.resolve(f["check_manifest"]))
      return 0
    if not f["out"]:
      raise ValueError("--out is required")
    if f["diffusers"] or f["hub"]:
      from convert import diffusers_t2v

      others = [k for k in ("ckpt", "diffusers_unet", "diffusers_vae", "clip_text_model", "tokenizer") if f[k]]
      if others:
        raise ValueError(f"--diffusers/--hub convert the whole pipeline folder: drop --{', --'.join(others)}")
      diffusers_t2v.run(out=f["out"], folder=f["diffusers"], hub=f["hub"], dtype=f["dtype"], variant=f["variant"])
      return 0
    run(
      out=f["out"],
      cfg=preset(f["model"]),
      dtype=f["dtype"],
      ckpt=f["ckpt"],
      diffusers_unet=f["diffusers_unet"],
      diffusers_vae=f["diffusers_vae"],
      clip_text_model=f["clip_text_model"],
      tokenizer_spec=f["tokenizer"],
      turbo_lora=f["turbo_lora"],
      turbo_unet=f["turbo_unet"],
    )
  except (ConversionError, UnsafeCheckpointError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def _help() -> str:
  """The module docstring and this converter's flags (absl's --help exits with status 1)."""
  return f"{__doc__.strip()}\n\nflags:\n{flags.FLAGS.main_module_help()}"


if __name__ == "__main__":
  if any(a in ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull") for a in sys.argv[1:]):
    print(_help())
    sys.exit(0)
  app.run(lambda argv: sys.exit(main(argv)))
