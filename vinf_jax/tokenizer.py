"""Prompt tokenizers: open_clip-identical CLIP BPE ids over transformers, and a byte fallback for the demo.

Both give ``[B, 77]`` int32 ids ``[SOT] + tokens + [EOT]`` padded with 0, truncated to 77 with the
last id set to EOT (architecture notes, section 5.4), through one interface: ``tok(list_of_str)``.

:class:`ClipTokenizer` reproduces open_clip 2.22.0's ``tokenize`` (the ``SimpleTokenizer`` that
VideoCrafter2 uses) exactly, with the BPE itself done by transformers' CLIP tokenizer (Rust). The
rest is done here in Python, because transformers' own pipeline differs from open_clip's in edge
cases:

* cleaning: open_clip runs ``ftfy.fix_text``, ``html.unescape`` twice, strip, ``\\s+`` -> one space,
  strip, ``lower()``. transformers' normalizer (NFC, whitespace, lowercase) skips ftfy and the HTML
  unescaping, and re-applies NFC after the unescaping (``e&#769;`` would become ``é``);
* splitting into words: open_clip's regex runs under Python's ``regex`` module, whose Unicode tables
  decide what ``\\p{L}`` and ``\\p{N}`` are; the Rust regex of transformers' pre-tokenizer may
  disagree on rare characters and silently drops what it does not match;
* special tokens: open_clip turns the literal text ``<start_of_text>`` / ``<end_of_text>`` into the
  special ids (only where its regex reaches them), while transformers would match ``<|endoftext|>``
  anywhere in the raw text.

So the text is cleaned and split into words here with open_clip's own regex, and transformers gets
the words pre-split (``is_split_into_words``) with its normalizer removed and its pre-tokenizer
reduced to the byte-level mapping; words cannot contain a transformers special token (each is only
letters, one digit, a contraction or only punctuation).

No torch here. The vocabulary files are open_clip's ``bpe_simple_vocab_16e6.txt.gz`` written out as a
transformers CLIP tokenizer directory (:func:`write_vocab_files`); an existing transformers CLIP
tokenizer directory with the same vocabulary (e.g. SD2's or zeroscope's ``tokenizer/``) loads too.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Protocol

import ftfy
import numpy as np
import regex

CONTEXT_LENGTH = 77
START_ID = 49406  # <start_of_text>
END_ID = 49407  # <end_of_text>
PAD_ID = 0  # open_clip pads with 0 (the token "!"), not with EOT

# open_clip keeps 49152 - 256 - 2 = 48894 merges, so that 256 bytes + 256 "</w>" forms + merges + 2
# specials = 49408 ids.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
# Names of the specials in the written vocab.json: transformers' CLIP names (open_clip calls them
# <start_of_text> / <end_of_text>; the ids are the same). See ClipTokenizer for the literal texts.
HF_START, HF_END = "<|startoftext|>", "<|endoftext|>"

_OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
# open_clip's SimpleTokenizer.pat, verbatim (with its default specials).
_WORD_RE = regex.compile(
  "|".join(_OPEN_CLIP_SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
_SPACE_RE = regex.compile(r"\s+")


class Tokenizer(Protocol):
  """What the pipeline needs: prompts -> ``[B, context_length]`` int32 ids."""

  context_length: int

  def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def clean(text: str) -> str:
  """open_clip's ``whitespace_clean(basic_clean(text)).lower()``."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _SPACE_RE.sub(" ", text).strip().lower()


def _pack(seqs: list[list[int]], context_length: int, pad_id: int = PAD_ID) -> np.ndarray:
  """``[SOT] + ids + [EOT]`` per row, ``pad_id``-padded; over-long rows cut to ``context_length``, ending in EOT."""
  out = np.full((len(seqs), context_length), pad_id, np.int32)
  for i, ids in enumerate(seqs):
    row = [START_ID, *ids, END_ID]
    if len(row) > context_length:
      row = row[:context_length]
      row[-1] = END_ID
    out[i, : len(row)] = row
  return out


def _as_list(texts: str | Sequence[str]) -> list[str]:
  return [texts] if isinstance(texts, str) else list(texts)


def truncation(tok, texts: str | Sequence[str]) -> list[tuple[int, int]] | None:
  """Per text, ``(tokens, dropped)``: its ids between SOT and EOT, and how many of them :func:`_pack` cuts off
  to fit ``tok.context_length`` (the last ones; 0 when it fits). None for a tokenizer without ``encode``."""
  if not hasattr(tok, "encode"):
    return None
  room = tok.context_length - 2
  return [(len(ids), max(0, len(ids) - room)) for ids in tok.encode(texts)]


# --------------------------------------------------------------------------------------------------
# Vocabulary files


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable character map, in CLIP's vocabulary order."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


def open_clip_bpe_path() -> str | None:
  """``bpe_simple_vocab_16e6.txt.gz`` of an installed open_clip (found without importing open_clip)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
  return path if os.path.exists(path) else None


def write_vocab_files(bpe_path: str, directory: str) -> None:
  """Write ``vocab.json`` and ``merges.txt`` (transformers' CLIP tokenizer files) from open_clip's BPE file.

  As open_clip: the merges are lines ``1 .. 48894`` of the file (line 0 is a header), and the vocabulary
  is the 256 byte characters, their ``</w>`` forms, one entry per merge, then the two specials.
  """
  with gzip.open(bpe_path) as f:
    lines = f.read().decode("utf-8").split("\n")
  merges = [tuple(m.split()) for m in lines[1 : NUM_MERGES + 1]]
  bad = [f"line {i + 1}: {m!r}" for i, m in enumerate(merges) if len(m) != 2]
  if len(merges) != NUM_MERGES or bad:
    raise ValueError(
      f"{bpe_path}: expected {NUM_MERGES} merges of two symbols after the header, got "
      f"{len(merges)}; malformed: {bad[:5]}"
    )
  chars = list(bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [HF_START, HF_END]
  encoder = {tok: i for i, tok in enumerate(vocab)}
  if len(encoder) != VOCAB_SIZE:
    raise ValueError(f"{bpe_path}: {len(encoder)} distinct vocabulary entries, expected {VOCAB_SIZE}")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(encoder, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


# --------------------------------------------------------------------------------------------------
# Tokenizers


class ClipTokenizer:
  """open_clip ``tokenize`` ids (VideoCrafter2's tokenizer) with transformers' CLIP BPE underneath.

  Build it with :func:`load_tokenizer`. See the module docstring for what is done in Python and why.
  """

  def __init__(self, hf_tokenizer, context_length: int = CONTEXT_LENGTH, pad_id: int = PAD_ID, pad_text: str = ""):
    from tokenizers import pre_tokenizers

    vocab = hf_tokenizer.get_vocab()
    errors = [
      f"{name} has id {vocab.get(name)}, expected {want}"
      for name, want in ((HF_START, START_ID), (HF_END, END_ID))
      if vocab.get(name) != want
    ]
    if len(vocab) != VOCAB_SIZE:
      errors.append(f"{len(vocab)} vocabulary entries, expected {VOCAB_SIZE}")
    if errors:
      raise ValueError("not open_clip's CLIP vocabulary: " + "; ".join(errors))
    backend = hf_tokenizer.backend_tokenizer
    backend.normalizer = None  # cleaning is open_clip's, done in clean()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # bytes -> chars only
    backend.post_processor = None
    self.hf_tokenizer = hf_tokenizer
    self.context_length = context_length
    self.pad_id = pad_id  # 0 as open_clip; a diffusers pipeline's tokenizer may pad with <|endoftext|> (49407)
    # A diffusers pipeline's pad token held as an added token ('!'): transformers reads it anywhere in a prompt
    self.pad_text = pad_text
    self._special = {s: i for s, i in zip(_OPEN_CLIP_SPECIALS, (START_ID, END_ID), strict=True)}

  def words(self, text: str) -> list[str]:
    """The cleaned text split as open_clip splits it (its regex under Python's ``regex`` module)."""
    return _WORD_RE.findall(clean(text))

  def segments(self, text: str) -> list[int | list[str]]:
    """The words of ``text`` grouped into runs of ordinary words, with open_clip's specials as their ids (and
    ``pad_text``, when set, as the pad id wherever it appears)."""
    out: list[int | list[str]] = []
    pieces = clean(text).split(self.pad_text) if self.pad_text else [clean(text)]
    words = [w for k, piece in enumerate(pieces) for w in ([self.pad_text] if k else []) + _WORD_RE.findall(piece)]
    for w in words:
      if self.pad_text and w == self.pad_text:
        out.append(self.pad_id)
      elif w in self._special:
        out.append(self._special[w])
      elif out and isinstance(out[-1], list):
        out[-1].append(w)
      else:
        out.append([w])
    return out

  def encode(self, texts: str | Sequence[str]) -> list[list[int]]:
    """BPE ids per prompt, without SOT/EOT, padding or truncation."""
    segments = [self.segments(t) for t in _as_list(texts)]
    runs = [s for segs in segments for s in segs if isinstance(s, list)]  # all prompts' runs in one batch
    ids = iter(self.hf_tokenizer(runs, is_split_into_words=True, add_special_tokens=False)["input_ids"] if runs else [])
    return [[t for s in segs for t in ([s] if isinstance(s, int) else next(ids))] for segs in segments]

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """``[B, context_length]`` int32 ids, equal to ``open_clip.tokenize(texts)`` (with ``pad_id`` 0)."""
    return _pack(self.encode(texts), self.context_length, self.pad_id)


def load_tokenizer(
  directory: str, context_length: int = CONTEXT_LENGTH, pad_id: int = PAD_ID, pad_text: str = ""
) -> ClipTokenizer:
  """The open_clip-identical tokenizer from a directory holding ``vocab.json`` and ``merges.txt``."""
  import transformers

  missing = [f for f in ("vocab.json", "merges.txt") if not os.path.exists(os.path.join(directory, f))]
  if missing:
    raise FileNotFoundError(f"{directory}: missing {missing}; write them with write_vocab_files(bpe_path, directory)")
  # CLIPTokenizerFast is the Rust-backed tokenizer in transformers 4 and an alias of CLIPTokenizer in 5;
  # from_pretrained reads vocab.json + merges.txt on both (a bare constructor does not on 5).
  hf = transformers.CLIPTokenizerFast.from_pretrained(
    directory, bos_token=HF_START, eos_token=HF_END, unk_token=HF_END, pad_token=HF_END
  )
  return ClipTokenizer(hf, context_length, pad_id, pad_text)


class ByteTokenizer:
  """UTF-8 bytes of the cleaned prompt as ids ``1 + byte``: for the built-in tiny demo model ONLY.

  This is NOT VideoCrafter2's tokenizer (its ids mean nothing to a real checkpoint). It needs no
  files, is deterministic, and keeps the start/end/pad ids and the truncation rule of open_clip, so the
  tiny model sees the same sequence layout as the real one.
  """

  def __init__(self, context_length: int = CONTEXT_LENGTH):
    self.context_length = context_length

  def encode(self, texts: str | Sequence[str]) -> list[list[int]]:
    """Byte ids per prompt, without SOT/EOT, padding or truncation."""
    return [[1 + b for b in clean(t).encode("utf-8")] for t in _as_list(texts)]

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """``[B, context_length]`` int32 ids in ``[1, 256]`` between SOT and EOT, zero-padded."""
    return _pack(self.encode(texts), self.context_length)
