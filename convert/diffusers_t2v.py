r"""Convert a diffusers text-to-video pipeline folder (``TextToVideoSDPipeline``) into a vinf_jax model directory.

  python -m convert.videocrafter2 --diffusers PIPELINE_DIR --out weights/NAME
  python -m convert.videocrafter2 --hub cerspense/zeroscope_v2_576w --out weights/zeroscope_576w  # HF cache, offline

The ModelScope family: ModelScope's text-to-video (damo-vilab/text-to-video-ms-1.7b), ZeroScope v2 (576w, XL),
fine-tunes published the same way (potat1, animov, zeroscope_v1_320s), and the diffusers port of VideoCrafter2.
A folder holds ``model_index.json`` and one folder per component; every component's config is read and mapped:

* ``unet/`` (``UNet3DConditionModel``, with or without VideoCrafter2's ``fps_embedding``): block widths, levels
  with attention, layers per block, head width, cross-attention width, groups -> :class:`UNetConfig`;
* ``vae/`` (``AutoencoderKL``): widths, layers, latent channels, scaling factor -> :class:`VAEConfig`;
* ``text_encoder/`` (transformers ``CLIPTextModel``, any layer count): the pipeline runs every stored layer and
  ``final_layer_norm`` (``last_hidden_state``) -> :class:`TextConfig` with ``layers_used = layers``;
* ``tokenizer/`` (``CLIPTokenizer``: ``vocab.json`` + ``merges.txt``): copied; its pad token becomes ``pad_id``;
* ``scheduler/`` (``DDIMScheduler`` or ``DPMSolverMultistepScheduler``): betas, prediction type, timestep
  spacing, steps_offset, set_alpha_to_one -> :class:`vinf_jax.schedule.Schedule` (kind 'diffusers').

Weights: ``.safetensors`` or ``.bin`` (also sharded with an ``.index.json``), plain or a variant
(``diffusion_pytorch_model.fp16.safetensors``; the plain file is preferred, ``--variant`` picks one), any
floating dtype. A component, a component class or a config field the model does not support is refused by
name; fields without effect on inference are listed as ignored. The strict tables of :mod:`convert.common`
then check every tensor (missing, unexpected, mis-shaped, non-float, NaN/inf), and everything is checked
before anything is converted; the output is written atomically (:func:`convert.videocrafter2.run`'s way).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import tempfile

from convert import text_table, vae_table
from convert.common import ConversionError, SourceTensor
from convert.torch_io import load_sources, weights_file_kind
from vinf_jax import schedule as schedule_lib
from vinf_jax import tokenizer, video_io
from vinf_jax.config import PRESETS, TINY, VIDEOCRAFTER2, ModelConfig, TextConfig, UNetConfig, VAEConfig, to_dtype

PIPELINES = ("TextToVideoSDPipeline", "VideoToVideoSDPipeline")
# component -> (library, accepted classes)
COMPONENTS = {
  "unet": ("diffusers", ("UNet3DConditionModel", "UNetVideoCrafter", "UNet3DVideoCrafterConditionModel")),
  "vae": ("diffusers", ("AutoencoderKL",)),
  "text_encoder": ("transformers", ("CLIPTextModel",)),
  "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
  "scheduler": ("diffusers", ("DDIMScheduler", "DPMSolverMultistepScheduler")),
}
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json"}
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# Fields of every diffusers config, and those that only describe a training or storage choice.
_DIFFUSERS_META = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
_FPS_KEY = "fps_embedding.linear_1.weight"


def _videocrafter2():
  """``convert.videocrafter2`` (its tokenizer copy, UNet table and saving), without importing it a second time
  when it runs as ``python -m convert.videocrafter2`` (absl would refuse its flags defined twice)."""
  main = sys.modules.get("__main__")
  if getattr(getattr(main, "__spec__", None), "name", None) == "convert.videocrafter2":
    return main
  from convert import videocrafter2

  return videocrafter2


class _Fields:
  """A config dict read field by field: what is used, what is ignored, and what is refused (by name)."""

  def __init__(self, what: str, cfg: dict, ignored: tuple[str, ...] = ()):
    self.what, self.cfg, self.errors = what, cfg, []
    self.ignored, self.used, self.read = set(ignored), set(_DIFFUSERS_META) | set(ignored), set()

  def get(self, name: str, default=None):
    self.used.add(name)
    self.read.add(name)
    return self.cfg.get(name, default)

  def want(self, name: str, allowed: tuple, default=None):
    """The field, which must be one of ``allowed`` (absent: ``default``)."""
    v = self.get(name, default)
    if v not in allowed:
      self.errors.append(f"{name}={v!r} is not supported (expected {' or '.join(map(repr, allowed))})")
    return v

  def refuse(self, msg: str) -> None:
    self.errors.append(msg)

  def done(self) -> list[str]:
    """Raise naming every refused value and every unknown field; return the ignored fields present."""
    unknown = sorted(k for k in self.cfg if k not in self.used)
    errors = self.errors + [f"{k}={self.cfg[k]!r}: a field this converter does not know" for k in unknown]
    if errors:
      raise ConversionError(f"{self.what}: not supported by this model:\n  - " + "\n  - ".join(errors))
    return sorted(k for k in self.cfg if k in self.ignored and k not in self.read)


# ------------------------------------------------------------------------------------------------
# Finding the folder and its files


def resolve_hub(repo_id: str, revision: str | None = None) -> str:
  """The snapshot folder of ``repo_id`` in the Hugging Face cache (offline: nothing is downloaded)."""
  import huggingface_hub
  from huggingface_hub.errors import LocalEntryNotFoundError

  try:
    return huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
  except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
    cache = huggingface_hub.constants.HF_HUB_CACHE
    raise FileNotFoundError(
      f"--hub {repo_id}: not in the Hugging Face cache ({cache}; HF_HOME / HF_HUB_CACHE move it): "
      f"{str(e).splitlines()[0].rstrip('.') if str(e) else type(e).__name__}. "
      f"Download it first (`hf download {repo_id}`), "
      "or pass the folder with --diffusers"
    ) from None


def read_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{what}: no {path}") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{what}: {path} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise ConversionError(f"{what}: {path} holds a JSON {type(d).__name__}, expected an object")
  return d


def read_model_index(folder: str) -> dict:
  """model_index.json, checked: a supported pipeline class with exactly the five supported components."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--diffusers {folder}: no such directory")
  index = read_json(os.path.join(folder, "model_index.json"), f"--diffusers {folder}")
  errors = []
  if index.get("_class_name") not in PIPELINES:
    errors.append(f"_class_name={index.get('_class_name')!r}, expected one of {PIPELINES}")
  for name, entry in index.items():
    if name.startswith("_") or entry in (None, [None, None]):
      continue
    if name not in COMPONENTS:
      errors.append(f"component {name!r} ({entry}) is not supported (this model has {', '.join(COMPONENTS)})")
      continue
    lib, classes = COMPONENTS[name]
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in classes):
      errors.append(f"component {name!r} is {entry!r}, expected [{lib!r}, one of {classes}]")
  missing = [c for c in COMPONENTS if c not in index]
  if missing:
    errors.append(f"components {missing} are missing")
  if errors:
    raise ConversionError(f"{folder}/model_index.json: not supported:\n  - " + "\n  - ".join(errors))
  return index


def weight_files(folder: str, component: str, variant: str | None = None) -> list[str]:
  """The weight file(s) of a component folder: ``NAME[.VARIANT].{safetensors,bin}`` (or their sharded index);
  the plain file first, then any variant, unless ``variant`` names one."""
  base = WEIGHT_NAMES[component]
  d = os.path.join(folder, component)
  names = [base, "pytorch_model"] if component == "text_encoder" else [base]
  found = sorted(os.listdir(d)) if os.path.isdir(d) else []
  variants = sorted({f.split(".")[1] for f in found if f.count(".") >= 2})
  for want_variant in [variant] if variant else [None, *variants]:
    for name in names:
      stem = f"{name}.{want_variant}" if want_variant else name
      for ext in ("safetensors", "bin"):
        if f"{stem}.{ext}" in found:
          return [os.path.join(d, f"{stem}.{ext}")]
        if f"{stem}.{ext}.index.json" in found:
          index = read_json(os.path.join(d, f"{stem}.{ext}.index.json"), f"{component} index")
          shards = sorted(set(index.get("weight_map", {}).values()))
          if not shards:
            raise ConversionError(f"{d}/{stem}.{ext}.index.json has an empty weight_map")
          return [os.path.join(d, s) for s in shards]
  which = f"{base}.{variant}" if variant else base
  raise FileNotFoundError(f"{component}: no {which}[.*].safetensors / .bin in {d} (files: {found[:8]})")


def load_component(files: list[str]) -> dict[str, SourceTensor]:
  out: dict[str, SourceTensor] = {}
  for f in files:
    part = load_sources(f)
    twice = sorted(set(part) & set(out))
    if twice:
      raise ConversionError(f"{f}: keys also in another shard: {twice[:8]}")
    out.update(part)
  return out


# ------------------------------------------------------------------------------------------------
# Configs


def unet_config(c: dict, keys: set[str], base: UNetConfig) -> tuple[UNetConfig, list[str]]:
  """``unet/config.json`` (+ whether the weights hold the fps embedding) -> UNetConfig."""
  f = _Fields("unet/config.json", c, ignored=("sample_size",))
  chans = tuple(f.get("block_out_channels", (320, 640, 1280, 1280)))
  down = tuple(f.get("down_block_types", ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)))
  up = tuple(f.get("up_block_types", ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3))
  levels = len(chans)
  if len(down) != levels or len(up) != levels or any(b not in ("CrossAttnDownBlock3D", "DownBlock3D") for b in down):
    f.refuse(f"down_block_types={list(down)} / up_block_types={list(up)}: expected {levels} 3D blocks each")
  attn = tuple(i for i, b in enumerate(down) if b == "CrossAttnDownBlock3D")
  mirror = tuple("CrossAttnUpBlock3D" if levels - 1 - i in attn else "UpBlock3D" for i in range(levels))
  if up != mirror:
    f.refuse(f"up_block_types={list(up)}: expected the mirror of down_block_types, {list(mirror)}")
  mc = chans[0] if chans else 0
  if not mc or any(ch % mc for ch in chans):
    f.refuse(f"block_out_channels={list(chans)}: expected multiples of the first")
  head = f.get("attention_head_dim", 64)
  if isinstance(head, list):
    head = head[0] if len(set(head)) == 1 else f.refuse(f"attention_head_dim={head}: expected one value")
  f.want("num_attention_heads", (None,))
  f.want("act_fn", ("silu",), "silu")
  f.want("norm_eps", (1e-5,), 1e-5)
  f.want("downsample_padding", (1,), 1)
  f.want("mid_block_scale_factor", (1, 1.0), 1)
  fps = _FPS_KEY in keys
  if f.get("fps_cond", fps) != fps:
    f.refuse(f"fps_cond={c.get('fps_cond')!r} but the weights {'hold' if fps else 'lack'} {_FPS_KEY}")
  g = f.get
  kw = dict(
    in_channels=g("in_channels", 4),
    out_channels=g("out_channels", 4),
    num_res_blocks=g("layers_per_block", 2),
    context_dim=g("cross_attention_dim", 1024),
    time_cond_proj_dim=g("time_cond_proj_dim") or 0,
    num_groups=g("norm_num_groups", 32),
  )
  ignored = f.done()
  cfg = dataclasses.replace(
    base,
    model_channels=mc,
    channel_mult=tuple(ch // mc for ch in chans),
    attention_levels=attn,
    num_head_channels=head,
    init_attn_heads=8,  # UNet3DConditionModel's transformer_in: 8 heads of attention_head_dim
    fps_cond=fps,
    motion_cond=False,
    **kw,
  )
  return _validated(cfg, "unet/config.json"), ignored


def vae_config(c: dict, base: VAEConfig) -> tuple[VAEConfig, list[str]]:
  """``vae/config.json`` -> VAEConfig (the KL-f8 layout: plain down/up encoder blocks, a mid attention)."""
  f = _Fields("vae/config.json", c, ignored=("sample_size", "force_upcast"))
  chans = tuple(f.get("block_out_channels", (64,)))
  n = len(chans)
  f.want("down_block_types", (["DownEncoderBlock2D"] * n, ("DownEncoderBlock2D",) * n), ["DownEncoderBlock2D"] * n)
  f.want("up_block_types", (["UpDecoderBlock2D"] * n, ("UpDecoderBlock2D",) * n), ["UpDecoderBlock2D"] * n)
  f.want("act_fn", ("silu",), "silu")
  for name in ("shift_factor", "latents_mean", "latents_std"):
    f.want(name, (None,))
  for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
    f.want(name, (True,), True)
  if not chans or any(ch % chans[0] for ch in chans):
    f.refuse(f"block_out_channels={list(chans)}: expected multiples of the first")
  latent, g = f.get("latent_channels", 4), f.get
  kw = dict(
    in_channels=g("in_channels", 3),
    out_channels=g("out_channels", 3),
    num_res_blocks=g("layers_per_block", 1),
    num_groups=g("norm_num_groups", 32),
    scale_factor=float(g("scaling_factor", 0.18215)),
  )
  ignored = f.done()
  ch = chans[0] if chans else 1
  cfg = dataclasses.replace(
    base, ch=ch, ch_mult=tuple(c // ch for c in chans), z_channels=latent, embed_dim=latent, **kw
  )
  return _validated(cfg, "vae/config.json"), ignored


def text_config(c: dict, pad: tuple[int, str], base: TextConfig) -> tuple[TextConfig, list[str]]:
  """``text_encoder/config.json`` (a CLIPTextConfig) -> TextConfig; every stored layer runs."""
  import transformers

  generic = tuple(transformers.PretrainedConfig().to_dict())  # every transformers config's own fields
  training = ("attention_dropout", "dropout", "initializer_factor", "initializer_range", "torch_dtype", "dtype")
  tokens = ("bos_token_id", "eos_token_id", "pad_token_id", "projection_dim")  # the tokenizer's; no projection
  f = _Fields("text_encoder/config.json", c, ignored=generic + training + tokens)
  f.want("architectures", (["CLIPTextModel"], None))
  f.want("model_type", ("clip_text_model",), "clip_text_model")
  f.want("hidden_act", ("gelu",), "quick_gelu")  # ViT-H/14's exact GELU; CLIP's QuickGELU is not implemented
  f.want("layer_norm_eps", (1e-5,), 1e-5)
  width, hidden = f.get("hidden_size", 512), f.get("intermediate_size", 2048)
  if hidden % width:
    f.refuse(f"intermediate_size={hidden}: expected a multiple of hidden_size={width}")
  layers, g = f.get("num_hidden_layers", 12), f.get
  kw = dict(
    vocab_size=g("vocab_size", 49408),
    context_length=g("max_position_embeddings", 77),
    heads=g("num_attention_heads", 8),
  )
  ignored = f.done()
  cfg = dataclasses.replace(
    base,
    width=width,
    layers=layers,
    layers_used=layers,  # the pipeline's last_hidden_state: every layer, then final_layer_norm
    mlp_ratio=hidden // width,
    pad_id=pad[0],
    pad_text=pad[1],
    **kw,
  )
  return _validated(cfg, "text_encoder/config.json"), ignored


_SCHEDULE_OFF = {  # fields of the two schedulers that must keep their no-effect value (ours has no such option)
  "trained_betas": (None,),
  "num_train_timesteps": (1000,),
  "thresholding": (False,),
  "rescale_betas_zero_snr": (False,),
}
_DDIM_OFF = {"clip_sample": (False,)}
_DPM_OFF = {
  "use_karras_sigmas": (False,),
  "use_exponential_sigmas": (False,),
  "use_beta_sigmas": (False,),
  "use_lu_lambdas": (False,),
  "use_flow_sigmas": (False,),
  "use_dynamic_shifting": (False,),
  "final_sigmas_type": ("zero",),
  "lambda_min_clipped": (-float("inf"),),
  "variance_type": (None,),
}
# The folder's own solver choices: replaced by --sampler (ddim = DDIMScheduler, dpmpp_sde = SDE-DPM-Solver++ 2M).
_SOLVER = (
  "algorithm_type",
  "solver_order",
  "solver_type",
  "lower_order_final",
  "euler_at_final",
  "dynamic_thresholding_ratio",
  "sample_max_value",
  "clip_sample_range",
  "skip_prk_steps",
  "flow_shift",
  "time_shift_type",
)


def schedule_config(c: dict) -> tuple[schedule_lib.Schedule, list[str]]:
  """``scheduler/scheduler_config.json`` -> Schedule (kind 'diffusers'); what our samplers cannot do is refused."""
  ddim = c.get("_class_name") == "DDIMScheduler"
  # the other scheduler's fields are leftovers of a from_config (Video-Infinity's DPM-Solver from ZeroScope's DDIM)
  leftovers = tuple(_DPM_OFF) if ddim else (*_DDIM_OFF, "set_alpha_to_one")
  f = _Fields("scheduler/scheduler_config.json", c, ignored=_SOLVER + leftovers)
  off = {**_SCHEDULE_OFF, **(_DDIM_OFF if ddim else _DPM_OFF)}
  for name, allowed in off.items():
    if name in c:
      f.want(name, allowed)
  kw = dict(
    kind="diffusers",
    beta_start=float(f.get("beta_start", 0.0001)),
    beta_end=float(f.get("beta_end", 0.02)),
    beta_schedule=f.want("beta_schedule", schedule_lib.BETA_SCHEDULES, "linear"),
    prediction_type=f.want("prediction_type", schedule_lib.PREDICTION_TYPES, "epsilon"),
    timestep_spacing=f.want("timestep_spacing", schedule_lib.SPACINGS[1:] + (None,)) or "",
    steps_offset=f.get("steps_offset", 0),
    set_alpha_to_one=bool(f.get("set_alpha_to_one", True)),  # DDIM's; DPM-Solver does not read it
  )
  ignored = f.done()
  return _validated(schedule_lib.Schedule(**kw), "scheduler/scheduler_config.json"), ignored


def tokenizer_files_dir(folder: str, staging: str) -> str:
  """A directory holding the pipeline tokenizer's ``vocab.json`` + ``merges.txt``: its own ``tokenizer/``, or (a
  tokenizer saved by transformers 5 holds only ``tokenizer.json``) ``staging``, written from its BPE model."""
  d = os.path.join(folder, "tokenizer")
  if all(os.path.isfile(os.path.join(d, n)) for n in ("vocab.json", "merges.txt")):
    return d
  model = read_json(os.path.join(d, "tokenizer.json"), "tokenizer (no vocab.json + merges.txt)").get("model", {})
  if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
    raise ConversionError(f"tokenizer: {d}/tokenizer.json holds no BPE model with a vocabulary")
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  os.makedirs(staging, exist_ok=True)
  with open(os.path.join(staging, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(model["vocab"], f, ensure_ascii=False)
  with open(os.path.join(staging, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
  return staging


def tokenizer_pad(folder: str, files_dir: str, context_length: int) -> tuple[int, str]:
  """The pad id of the pipeline's CLIP tokenizer (its tokenizer_config.json / special_tokens_map.json), and its
  text when it is an added token ('!': transformers reads it anywhere in a prompt; '' for the specials); its
  ``model_max_length``, when given, must be the text encoder's context."""
  d = os.path.join(folder, "tokenizer")
  pad, max_len = None, None
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(d, name)
    if os.path.isfile(path):
      conf = read_json(path, "tokenizer")
      pad, max_len = conf.get("pad_token", pad), conf.get("model_max_length", max_len)
  if max_len is not None and max_len != context_length:
    raise ConversionError(
      f"tokenizer: model_max_length={max_len!r} is not supported (expected the text encoder's {context_length})"
    )
  pad = pad.get("content") if isinstance(pad, dict) else pad
  if pad is None:
    return tokenizer.PAD_ID, ""
  vocab = read_json(os.path.join(files_dir, "vocab.json"), "tokenizer")
  if pad not in vocab:
    raise ConversionError(f"tokenizer: pad_token {pad!r} is not in the vocabulary")
  return int(vocab[pad]), ("" if pad in (tokenizer.HF_START, tokenizer.HF_END) else pad)


def _validated(cfg, what: str):
  try:
    return cfg.validate()
  except ValueError as e:
    raise ConversionError(f"{what}: " + str(e).replace(":\n  - ", ": ").replace("\n  - ", "; ")) from None


# ------------------------------------------------------------------------------------------------
# The whole pipeline


@dataclasses.dataclass
class Pipeline:
  """A pipeline folder, read and checked: the model config, the weight files and what was ignored."""

  folder: str
  model: ModelConfig
  files: dict[str, list[str]]
  classes: dict[str, str]
  ignored: dict[str, list[str]]
  tokenizer_dir: str


def _name_and_kind(folder: str, source: str, unet: UNetConfig, text: TextConfig) -> tuple[str, tuple, str]:
  """The preset this pipeline's shapes are (chosen by the folder's or repo's name), or 'diffusers_t2v'."""
  low = source.lower()
  guess = (
    "zeroscope_xl"
    if "zeroscope" in low and "xl" in low
    else "zeroscope_576w"
    if "zeroscope" in low
    else "modelscope"
    if "text-to-video-ms" in low or "modelscope" in low
    else None
  )
  for name in (guess, "tiny_t2v"):
    p = PRESETS.get(name)
    if p is not None and p.unet == unet and p.text == text:
      return name, p.video_size, f"{p.kind}; diffusers pipeline {source}"
  size = (16, 256, 256) if unet.model_channels >= VIDEOCRAFTER2.unet.model_channels else TINY.video_size
  return "diffusers_t2v", size, f"diffusers TextToVideoSDPipeline {source}"


def read_pipeline(folder: str, tok_dir: str, *, variant: str | None = None, source: str | None = None) -> Pipeline:
  """Read and check a pipeline folder without loading any tensor (configs, weight files' kinds, tokenizer);
  ``tok_dir``: where the tokenizer's vocab.json + merges.txt are (:func:`tokenizer_files_dir`)."""
  index = read_model_index(folder)
  files = {c: weight_files(folder, c, variant) for c in WEIGHT_NAMES}
  for c, fs in files.items():
    for path in fs:
      weights_file_kind(path, c)
  unet_keys = set(load_component(files["unet"]))  # lazy: only the headers are read
  configs = {c: read_json(os.path.join(folder, c, n), c) for c, n in CONFIG_FILES.items()}
  sched_cfg = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"), "scheduler")
  ignored = {}
  unet, ignored["unet"] = unet_config(configs["unet"], unet_keys, VIDEOCRAFTER2.unet)
  vae, ignored["vae"] = vae_config(configs["vae"], VIDEOCRAFTER2.vae)
  text_c = configs["text_encoder"]
  pad = tokenizer_pad(folder, tok_dir, text_c.get("max_position_embeddings", 77))
  text, ignored["text_encoder"] = text_config(text_c, pad, VIDEOCRAFTER2.text)
  sched, ignored["scheduler"] = schedule_config(sched_cfg)
  source = source or os.path.basename(os.path.normpath(folder))
  name, size, kind = _name_and_kind(folder, source, unet, text)
  model = ModelConfig(name=name, unet=unet, vae=vae, text=text, schedule=sched, video_size=size, kind=kind)
  classes = {c: index[c][1] for c in COMPONENTS}
  return Pipeline(folder, model, files, classes, {k: v for k, v in ignored.items() if v}, tok_dir)


def convert_pipeline(p: Pipeline, tmp: str, dtype: str, save) -> list[str]:
  """Convert every component of ``p`` into ``tmp`` (``save(tmp, name, params)``); returns the components."""
  videocrafter2 = _videocrafter2()

  np_dtype = to_dtype(dtype)
  cfg = p.model.with_dtype("float32", dtype)
  print(f"reading {p.folder} ({cfg.name}: {cfg.kind})")
  save(tmp, "unet", videocrafter2.convert_unet(load_component(p.files["unet"]), cfg, "diffusers", np_dtype))
  gc.collect()
  save(tmp, "vae", vae_table.convert_vae(load_component(p.files["vae"]), cfg.vae))
  gc.collect()
  src = load_component(p.files["text_encoder"])
  save(tmp, "text_encoder", text_table.convert_text(src, cfg.text, layout="hf"))
  videocrafter2.tokenizer_files(p.tokenizer_dir, os.path.join(tmp, "tokenizer"))
  return ["unet", "vae", "text_encoder", "tokenizer"]


def run(
  *, out: str, folder: str | None = None, hub: str | None = None, dtype: str = "float32", variant: str | None = None
) -> ModelConfig:
  """Convert a pipeline folder (or the Hugging Face cache's snapshot of ``hub``) into ``out``, atomically."""
  videocrafter2 = _videocrafter2()

  if (folder is None) == (hub is None):
    raise ValueError("give exactly one of --diffusers PIPELINE_DIR and --hub REPO_ID")
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ValueError(f"--out {out} already exists; choose a new directory")
  folder = resolve_hub(hub) if hub else folder
  read_model_index(folder)  # the folder's errors first
  with tempfile.TemporaryDirectory(prefix="vinf_jax-tokenizer-") as staging:
    p = read_pipeline(folder, tokenizer_files_dir(folder, staging), variant=variant, source=hub)
    video_io.check_writable(out, "--out", directory=True)
    videocrafter2.tokenizer_files(p.tokenizer_dir, os.path.join(staging, "check"))  # it loads, before converting
    for c, names in p.ignored.items():
      print(f"  {c}: ignored (no effect on inference here): {', '.join(names)}")
    components = _write(p, out, hub or os.path.basename(os.path.normpath(folder)), dtype)
  print(f"wrote {out}: {', '.join(components)} ({p.model.name})")
  return p.model


def _write(p: Pipeline, out: str, source: str, dtype: str) -> list[str]:
  """Convert ``p`` into a temporary directory beside ``out`` and rename it into place (or leave nothing)."""
  videocrafter2 = _videocrafter2()

  with videocrafter2.staged_output(out) as tmp:
    components = convert_pipeline(p, tmp, dtype, videocrafter2._save)
    meta = {
      "format_version": videocrafter2.FORMAT_VERSION,
      "model": json.loads(p.model.with_dtype("float32", dtype).to_json()),
      "components": components,
      "stored_dtype": dtype,
      "source": source,
      "pipeline": {"classes": p.classes, "files": {c: [os.path.basename(f) for f in fs] for c, fs in p.files.items()}},
    }
    videocrafter2.write_meta(tmp, meta)
  return components
