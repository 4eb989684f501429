"""Reading PyTorch checkpoints safely: ``torch.load(weights_only=True, mmap=True)`` or safetensors.

A checkpoint is untrusted input: a pickle that would run code is refused by torch's restricted
unpickler before anything runs, and that refusal is reported as :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

from convert.common import ConversionError, SourceTensor

DEEPSPEED_PREFIX = "_forward_module."  # 16 characters, stripped by VideoCrafter's loader


class UnsafeCheckpointError(ValueError):
  pass


def _torch():
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("converting PyTorch weights needs torch: pip install -e '.[convert]'") from e
  return torch


SAFETENSORS_DTYPES = {
  "F64": "float64",
  "F32": "float32",
  "F16": "float16",
  "BF16": "bfloat16",
  "I64": "int64",
  "I32": "int32",
  "I16": "int16",
  "I8": "int8",
  "U8": "uint8",
  "BOOL": "bool",
}


def weights_file_kind(path: str | os.PathLike, what: str = "checkpoint") -> str:
  """'torch' (zip or legacy pickle) or 'safetensors', read from the file's first bytes (and for
  safetensors its header); ConversionError in one line naming the file and what it is not.

  Cheap: reads the head of the file and, for a zip archive, its central directory (which a truncated
  download lacks), never the tensors.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ConversionError(f"{what} {path} is a directory, expected a weights file")
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(512)
  except OSError as e:
    raise ConversionError(f"{what} {path}: {e.strerror or e}") from None
  if size == 0:
    raise ConversionError(f"{what} {path} is empty (0 bytes)")
  if head.startswith(b"PK\x03\x04"):
    if not zipfile.is_zipfile(path):
      raise ConversionError(f"{what} {path} is a truncated zip archive ({size} bytes; the download did not finish?)")
    with zipfile.ZipFile(path) as z:
      if not any(n.endswith("data.pkl") for n in z.namelist()):
        raise ConversionError(f"{what} {path} is a zip archive but not a PyTorch checkpoint (no data.pkl)")
    return "torch"
  if len(head) >= 9 and head[8:9] == b"{":  # a little-endian header length, then its JSON ('{' is no pickle opcode)
    return _check_safetensors(path, size, what)
  if head[:1] == b"\x80":  # a pickle (torch.save's legacy format)
    return "torch"
  if b"\x00" not in head:
    try:
      head.decode("utf-8")
      raise ConversionError(f"{what} {path} is a text file, not a PyTorch or safetensors checkpoint")
    except UnicodeDecodeError:
      pass
  raise ConversionError(f"{what} {path} is neither a PyTorch checkpoint (zip or pickle) nor a safetensors file")


def _check_safetensors(path: str, size: int, what: str) -> str:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
      raise ConversionError(f"{what} {path} is a truncated safetensors file (its header alone is {n} bytes)")
    try:
      header = json.loads(f.read(n))
      end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
      raise ConversionError(f"{what} {path} has a damaged safetensors header") from None
  if 8 + n + end > size:
    raise ConversionError(
      f"{what} {path} is a truncated safetensors file ({size} bytes, its header describes {8 + n + end})"
    )
  return "safetensors"


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
    if "weights only" not in str(e).lower():  # not the restricted unpickler's refusal: a damaged file
      raise ConversionError(f"checkpoint {path} cannot be read (damaged?): {str(e).splitlines()[0]}") from None
    raise UnsafeCheckpointError(
      f"refused to load {path}: it is not a plain tensor checkpoint (torch's weights_only loader "
      f"rejected it, nothing in it was run): {str(e).splitlines()[0]}"
    ) from e
  except (RuntimeError, EOFError, ValueError, OSError) as e:  # truncated or damaged archives and pickles
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConversionError(f"checkpoint {path} cannot be read (truncated or damaged?): {first}") from None


def load_safetensors(path: str | os.PathLike) -> dict[str, SourceTensor]:
  from safetensors import safe_open

  weights_file_kind(path)  # a truncated or foreign file fails here, in one line
  try:
    f = safe_open(os.fspath(path), framework="numpy")
  except Exception as e:  # safetensors raises its own SafetensorError for damaged files
    raise ConversionError(f"safetensors file {path} cannot be read: {str(e).splitlines()[0]}") from None
  out = {}
  for k in f.keys():
    sl = f.get_slice(k)
    dtype = str(sl.get_dtype())
    out[k] = SourceTensor(
      tuple(sl.get_shape()),
      (lambda k=k: np.asarray(f.get_tensor(k), np.float32)),
      SAFETENSORS_DTYPES.get(dtype.upper(), dtype.lower()),
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
  if path.endswith(".safetensors") or weights_file_kind(path) == "safetensors":
    return load_safetensors(path)
  obj = load_torch_file(path)
  try:
    return torch_sources(unwrap_state_dict(obj))
  except ValueError as e:  # not a dict of tensors
    raise ConversionError(f"{path}: {e}") from None


def load_tensor_list(path: str | os.PathLike) -> list[SourceTensor]:
  """A torch-saved plain list of tensors (T2V-Turbo v1's ``unet_lora.pt``), as lazy float32 sources."""
  torch = _torch()
  obj = load_torch_file(path)
  if not isinstance(obj, list | tuple):
    raise ConversionError(f"{os.fspath(path)} holds a {type(obj).__name__}, expected a list of tensors (unet_lora.pt)")
  bad = [i for i, v in enumerate(obj) if not isinstance(v, torch.Tensor)]
  if bad:
    raise ConversionError(f"{os.fspath(path)}: list entries {bad[:8]} are not tensors")
  return list(torch_sources({str(i): v for i, v in enumerate(obj)}).values())
