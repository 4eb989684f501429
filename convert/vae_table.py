"""Key tables for the KL-f8 autoencoder: flax path of ``vinf_jax.models.vae`` -> source key + transform.

Two source layouts, both generated from the same walk over the config so they cannot drift apart:

* ``ldm``: VideoCrafter2's ``first_stage_model.*`` keys with the prefix stripped (``encoder.down.0...``).
  The attention's q/k/v/proj_out are 1x1 Conv2d there ([C, C, 1, 1]: ``conv1x1_as_linear``).
* ``diffusers``: ``AutoencoderKL`` state dicts (``encoder.down_blocks.0.resnets.0...``), whose attention
  projections are Linear ([C, C]) named ``to_q/to_k/to_v/to_out.0`` (``legacy`` checkpoints saved before
  diffusers renamed them: ``query/key/value/proj_attn``). The decoder's ``up_blocks`` run in execution
  order, so ``up_blocks.{i}`` is LDM's ``up.{L-1-i}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from convert import common
from convert.common import Path, Rule
from vinf_jax.config import VIDEOCRAFTER2, VAEConfig, to_dtype
from vinf_jax.models import vae

LDM_PREFIX = "first_stage_model."
LAYOUTS = ("ldm", "diffusers", "diffusers_legacy")

# (ldm name, diffusers name, legacy diffusers name) of the attention block's parameterised modules.
_ATTN = (
  ("norm", "group_norm", "group_norm"),
  ("q", "to_q", "query"),
  ("k", "to_k", "key"),
  ("v", "to_v", "value"),
  ("proj_out", "to_out.0", "proj_attn"),
)
# One module of the model: (flax path, kind, ldm key, diffusers key, legacy diffusers key).
_Module = tuple[Path, str, str, str, str]


def _resnet(path: Path, ldm: str, hf: str, shortcut: bool) -> Iterator[_Module]:
  for name in ("norm1", "conv1", "norm2", "conv2"):
    kind = "norm" if name.startswith("norm") else "conv"
    yield path + (name,), kind, f"{ldm}.{name}", f"{hf}.{name}", f"{hf}.{name}"
  if shortcut:
    yield path + ("nin_shortcut",), "conv", f"{ldm}.nin_shortcut", f"{hf}.conv_shortcut", f"{hf}.conv_shortcut"


def _mid(path: Path, ldm: str, hf: str) -> Iterator[_Module]:
  yield from _resnet(path + ("block_1",), f"{ldm}.block_1", f"{hf}.resnets.0", False)
  for name, hf_name, legacy in _ATTN:
    kind = "norm" if name == "norm" else "attn"
    yield (
      path + ("attn_1", name),
      kind,
      f"{ldm}.attn_1.{name}",
      f"{hf}.attentions.0.{hf_name}",
      f"{hf}.attentions.0.{legacy}",
    )
  yield from _resnet(path + ("block_2",), f"{ldm}.block_2", f"{hf}.resnets.1", False)


def _modules(cfg: VAEConfig) -> Iterator[_Module]:
  """Every parameterised module, in the order of the LDM state dict."""
  chans = [cfg.ch * m for m in cfg.ch_mult]
  levels = len(chans)
  yield ("encoder", "conv_in"), "conv", "encoder.conv_in", "encoder.conv_in", "encoder.conv_in"
  cin = cfg.ch
  for i, c in enumerate(chans):
    for j in range(cfg.num_res_blocks):
      yield from _resnet(
        ("encoder", "down", i, "block", j),
        f"encoder.down.{i}.block.{j}",
        f"encoder.down_blocks.{i}.resnets.{j}",
        cin != c,
      )
      cin = c
    if i != levels - 1:
      yield (
        ("encoder", "down", i, "downsample", "conv"),
        "conv",
        f"encoder.down.{i}.downsample.conv",
        f"encoder.down_blocks.{i}.downsamplers.0.conv",
        f"encoder.down_blocks.{i}.downsamplers.0.conv",
      )
  yield from _mid(("encoder", "mid"), "encoder.mid", "encoder.mid_block")
  yield ("encoder", "norm_out"), "norm", "encoder.norm_out", "encoder.conv_norm_out", "encoder.conv_norm_out"
  yield ("encoder", "conv_out"), "conv", "encoder.conv_out", "encoder.conv_out", "encoder.conv_out"

  yield ("decoder", "conv_in"), "conv", "decoder.conv_in", "decoder.conv_in", "decoder.conv_in"
  yield from _mid(("decoder", "mid"), "decoder.mid", "decoder.mid_block")
  for i in range(levels):
    k = levels - 1 - i  # diffusers' up_blocks are numbered in execution order, lowest resolution first
    cin = chans[i + 1] if i + 1 < levels else chans[-1]
    for j in range(cfg.num_res_blocks + 1):
      yield from _resnet(
        ("decoder", "up", i, "block", j),
        f"decoder.up.{i}.block.{j}",
        f"decoder.up_blocks.{k}.resnets.{j}",
        cin != chans[i],
      )
      cin = chans[i]
    if i != 0:
      yield (
        ("decoder", "up", i, "upsample", "conv"),
        "conv",
        f"decoder.up.{i}.upsample.conv",
        f"decoder.up_blocks.{k}.upsamplers.0.conv",
        f"decoder.up_blocks.{k}.upsamplers.0.conv",
      )
  yield ("decoder", "norm_out"), "norm", "decoder.norm_out", "decoder.conv_norm_out", "decoder.conv_norm_out"
  yield ("decoder", "conv_out"), "conv", "decoder.conv_out", "decoder.conv_out", "decoder.conv_out"

  yield ("quant_conv",), "conv", "quant_conv", "quant_conv", "quant_conv"
  yield ("post_quant_conv",), "conv", "post_quant_conv", "post_quant_conv", "post_quant_conv"


# kind -> (flax leaf, torch leaf, transform) per layout; the attention projections differ by layout.
_LEAVES = {
  "norm": {"*": (("scale", "weight", "identity"), ("bias", "bias", "identity"))},
  "conv": {"*": (("kernel", "weight", "conv"), ("bias", "bias", "identity"))},
  "attn": {
    "ldm": (("kernel", "weight", "conv1x1_as_linear"), ("bias", "bias", "identity")),
    "*": (("kernel", "weight", "linear"), ("bias", "bias", "identity")),
  },
}


def table(cfg: VAEConfig, layout: str = "ldm") -> dict[Path, Rule]:
  """{flax path: Rule(source key, transform)} for ``layout`` in :data:`LAYOUTS`.

  LDM keys are relative to ``first_stage_model.`` (see :data:`LDM_PREFIX`).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}, expected one of {LAYOUTS}")
  col = LAYOUTS.index(layout)
  out: dict[Path, Rule] = {}
  for mod in _modules(cfg):
    path, kind, key = mod[0], mod[1], mod[2 + col]
    leaves = _LEAVES[kind].get(layout, _LEAVES[kind]["*"])
    for leaf, torch_leaf, transform in leaves:
      out[path + (leaf,)] = Rule(f"{key}.{torch_leaf}", transform)
  return out


def ldm_table(cfg: VAEConfig) -> dict[Path, Rule]:
  """The table for VideoCrafter2 / LDM keys (``first_stage_model.`` stripped)."""
  return table(cfg, "ldm")


def diffusers_table(cfg: VAEConfig, *, legacy: bool = False) -> dict[Path, Rule]:
  """The table for diffusers ``AutoencoderKL`` keys (``legacy``: query/key/value/proj_attn names)."""
  return table(cfg, "diffusers_legacy" if legacy else "diffusers")


def detect_layout(keys: Mapping[str, object] | list[str]) -> str:
  """'ldm', 'diffusers' or 'diffusers_legacy' from the key names (prefix already stripped)."""
  keys = set(keys)
  if any(k.startswith("encoder.down.") for k in keys):
    return "ldm"
  if any(k.startswith("encoder.down_blocks.") for k in keys):
    if "encoder.mid_block.attentions.0.query.weight" in keys:
      return "diffusers_legacy"
    return "diffusers"
  hint = f" (strip the {LDM_PREFIX!r} prefix first)" if any(k.startswith(LDM_PREFIX) for k in keys) else ""
  raise common.ConversionError(
    f"VAE: keys are neither LDM (encoder.down.*) nor diffusers (encoder.down_blocks.*){hint}"
  )


def _check(rules: Mapping[Path, Rule], targets: Mapping[Path, tuple], shapes: Mapping[str, tuple], what: str) -> None:
  """``common.check_table``, plus: sources of ``conv1x1_as_linear`` must be [O, I, 1, 1].

  That transform takes ``w[:, :, 0, 0]``, so on its own it would accept (and crop) a 3x3 kernel, and
  fail with an IndexError on a 2-D tensor.
  """
  shapes = {k: tuple(v) for k, v in shapes.items()}
  not_1x1 = []
  for path, r in rules.items():
    got = shapes.get(r.source)
    if r.transform == "conv1x1_as_linear" and got is not None and (len(got) != 4 or got[2:] != (1, 1)):
      not_1x1.append(f"{r.source} {got}: expected a 1x1 Conv2d kernel [O, I, 1, 1]")
      # Stand in the expected shape, so check_table reports only the other problems.
      kernel = targets[path][0] if path in targets else (1, 1)
      shapes[r.source] = (kernel[1], kernel[0], 1, 1)
  extra = f"  {len(not_1x1)} mis-shaped tensors:\n      " + "\n      ".join(sorted(not_1x1)) if not_1x1 else ""
  try:
    common.check_table(rules, targets, shapes, what)
  except common.ConversionError as err:
    raise common.ConversionError("\n".join(filter(None, (str(err), extra)))) from None
  if extra:
    raise common.ConversionError(f"{what}: the checkpoint does not match the model\n{extra}")


def convert_vae(sources: Mapping[str, common.SourceTensor], cfg: VAEConfig, *, layout: str | None = None) -> dict:
  """Strictly convert VAE tensors (prefix stripped) into the nested parameter dict of ``vae.from_params``.

  Args:
    sources: source key -> lazy tensor; LDM keys without ``first_stage_model.`` or diffusers keys.
    cfg: the VAE config the parameters are for.
    layout: one of :data:`LAYOUTS`, or None to detect it from the keys.

  Raises:
    common.ConversionError: listing missing, unexpected and mis-shaped keys.
  """
  layout = layout or detect_layout(sources)
  rules, what = table(cfg, layout), f"VAE ({layout} keys)"
  targets = common.target_shapes(vae.abstract(cfg))
  _check(rules, targets, {k: s.shape for k, s in sources.items()}, what)
  return common.convert(rules, targets, sources, to_dtype(cfg.param_dtype), what)


def check_manifest_vae(manifest_shapes: Mapping[str, object], *, cfg: VAEConfig = VIDEOCRAFTER2.vae) -> int:
  """Map the ``first_stage_model.*`` keys of a checkpoint manifest onto the abstract VAE.

  Args:
    manifest_shapes: full checkpoint key -> shape (list or tuple), e.g. the ``"tensors"`` entry of
      ``convert/manifests/videocrafter2_state_dict.json``; keys outside ``first_stage_model.`` are ignored.
    cfg: the VAE config (the full-size VideoCrafter2 VAE by default).

  Returns:
    The number of VAE keys, all mapped (248 for VideoCrafter2).

  Raises:
    common.ConversionError: naming every missing, unexpected or mis-shaped key.
  """
  sources = {
    k[len(LDM_PREFIX) :]: tuple(int(d) for d in shape)
    for k, shape in manifest_shapes.items()
    if k.startswith(LDM_PREFIX)
  }
  targets = common.target_shapes(vae.abstract(cfg))
  _check(ldm_table(cfg), targets, sources, f"VAE ({LDM_PREFIX}* keys)")
  return len(sources)
