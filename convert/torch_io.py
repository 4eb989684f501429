"""Reading PyTorch checkpoints safely: ``torch.load(weights_only=True, mmap=True)`` or safetensors.

A checkpoint is untrusted input: a pickle that would run code is refused by torch's restricted
unpickler before anything runs, and that refusal is reported as :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping

import numpy as np

from convert.common import SourceTensor

DEEPSPEED_PREFIX = "_forward_module."  # 16 characters, stripped by VideoCrafter's loader


class UnsafeCheckpointError(ValueError):
  pass


def _torch():
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("converting PyTorch weights needs torch: pip install -e '.[convert]'") from e
  return torch


def load_torch_file(path: str | os.PathLike) -> Mapping:
  """Load a ``.ckpt``/``.pt``/``.bin`` with the restricted unpickler, memory-mapped where possible."""
  torch = _torch()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path}")
  mmap = zipfile.is_zipfile(path)  # mmap works for the zip format (torch >= 1.6) only
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
      f"refused to load {path}: it is not a plain tensor checkpoint (torch's weights_only loader "
      f"rejected it, nothing in it was run): {str(e).splitlines()[0]}"
    ) from e


def load_safetensors(path: str | os.PathLike) -> dict[str, SourceTensor]:
  from safetensors import safe_open

  f = safe_open(os.fspath(path), framework="numpy")
  out = {}
  for k in f.keys():
    sl = f.get_slice(k)
    out[k] = SourceTensor(
      tuple(sl.get_shape()),
      (lambda k=k: np.asarray(f.get_tensor(k), np.float32)),
      str(sl.get_dtype()).lower().replace("f16", "float16").replace("bf16", "bfloat16").replace("f32", "float32"),
    )
  return out


def unwrap_state_dict(obj: Mapping) -> dict:
  """The three layouts VideoCrafter's loader accepts: {'module': {'_forward_module.' + k}}, {'state_dict'}, bare."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
  if "module" in obj and isinstance(obj["module"], Mapping):
    sd = obj["module"]
    return {(k[len(DEEPSPEED_PREFIX) :] if k.startswith(DEEPSPEED_PREFIX) else k): v for k, v in sd.items()}
  if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    return dict(obj["state_dict"])
  return dict(obj)


def torch_sources(sd: Mapping) -> dict[str, SourceTensor]:
  """Lazy float32 numpy views of torch tensors (any stored dtype; cast one tensor at a time)."""
  torch = _torch()
  out = {}
  for k, v in sd.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = SourceTensor(
      tuple(v.shape), (lambda v=v: v.detach().to(torch.float32).numpy()), str(v.dtype).removeprefix("torch.")
    )
  return out


def load_sources(path: str | os.PathLike) -> dict[str, SourceTensor]:
  """Any supported file (safetensors or torch pickle, any of the three layouts) -> lazy sources."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  return torch_sources(unwrap_state_dict(load_torch_file(path)))


def load_tensor_list(path: str | os.PathLike) -> list[SourceTensor]:
  """A torch-saved plain list of tensors (T2V-Turbo v1's ``unet_lora.pt``), as lazy float32 sources."""
  torch = _torch()
  obj = load_torch_file(path)
  if not isinstance(obj, list | tuple):
    raise ValueError(f"{os.fspath(path)} holds a {type(obj).__name__}, expected a list of tensors (unet_lora.pt)")
  bad = [i for i, v in enumerate(obj) if not isinstance(v, torch.Tensor)]
  if bad:
    raise ValueError(f"{os.fspath(path)}: list entries {bad[:8]} are not tensors")
  return list(torch_sources({str(i): v for i, v in enumerate(obj)}).values())
