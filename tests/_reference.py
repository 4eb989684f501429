"""Independent references for the text-encoder and tokenizer tests.

open_clip 2.22.0 is installed with ``pip install --no-deps open_clip_torch==2.22.0``: its package
``__init__`` imports torchvision (which would pull a CUDA torch), so the package is located without
being imported and only its ``tokenizer.py`` (ftfy, regex, torch) is loaded from the file.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys


def open_clip_dir() -> str:
  spec = importlib.util.find_spec("open_clip")  # does not execute open_clip/__init__.py
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("open_clip is not installed: pip install --no-deps open_clip_torch==2.22.0")
  return spec.submodule_search_locations[0]


@functools.cache
def open_clip_tokenizer_module():
  """open_clip's ``tokenizer.py`` as a stand-alone module (``tokenize``, ``SimpleTokenizer``)."""
  name = "_open_clip_reference_tokenizer"
  spec = importlib.util.spec_from_file_location(name, os.path.join(open_clip_dir(), "tokenizer.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def open_clip_bpe_path() -> str:
  return os.path.join(open_clip_dir(), "bpe_simple_vocab_16e6.txt.gz")


def open_clip_text_tower(
  width: int, heads: int, layers: int, vocab_size: int = 49408, context_length: int = 77, embed_dim: int | None = None
):
  """open_clip 2.22.0's text tower (``transformer.py``) as VideoCrafter2 builds it, re-typed in torch.

  open_clip's ``transformer.py`` cannot be loaded alone (its ``utils`` imports torchvision), so its
  modules are written out here with the same names and the same ``nn.MultiheadAttention`` (packed
  in_proj, rows q|k|v). ``encode(tokens, layer_idx=1)`` is ``FrozenOpenCLIPEmbedder.encode_with_transformer``
  of ``lvdm/modules/encoders/condition.py``: the blocks up to the penultimate, then ``ln_final``.
  """
  from collections import OrderedDict

  import torch
  from torch import nn

  class ResidualAttentionBlock(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1 = nn.LayerNorm(width)
      self.attn = nn.MultiheadAttention(width, heads)
      self.ln_2 = nn.LayerNorm(width)
      self.mlp = nn.Sequential(
        OrderedDict(
          [("c_fc", nn.Linear(width, width * 4)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(width * 4, width))]
        )
      )

    def forward(self, x, attn_mask):  # x: [L, N, D]
      y = self.ln_1(x)
      x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
      return x + self.mlp(self.ln_2(x))

  class Transformer(nn.Module):
    def __init__(self):
      super().__init__()
      self.resblocks = nn.ModuleList([ResidualAttentionBlock() for _ in range(layers)])

  class TextTower(nn.Module):
    def __init__(self):
      super().__init__()
      self.token_embedding = nn.Embedding(vocab_size, width)
      self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
      self.transformer = Transformer()
      self.ln_final = nn.LayerNorm(width)
      self.text_projection = nn.Parameter(torch.empty(width, embed_dim or width))
      self.logit_scale = nn.Parameter(torch.ones([]))
      mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
      self.register_buffer("attn_mask", mask, persistent=False)

    def encode(self, tokens, layer_idx: int = 1):
      x = self.token_embedding(tokens) + self.positional_embedding
      x = x.permute(1, 0, 2)  # NLD -> LND
      for i, r in enumerate(self.transformer.resblocks):
        if i == len(self.transformer.resblocks) - layer_idx:
          break
        x = r(x, attn_mask=self.attn_mask)
      return self.ln_final(x.permute(1, 0, 2))

  return TextTower()
