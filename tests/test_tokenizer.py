"""The CLIP tokenizer against open_clip 2.22.0's ``tokenize`` (VideoCrafter2's), and the byte fallback."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tests import _reference
from vinf_jax import tokenizer as tk

PROMPTS = [
  "",
  " ",
  "\n\t  \r\n",
  "a photo of a cat",
  "A corgi running on the beach at sunset, 4k, highly detailed",
  "ThE QuIcK BrOwN FoX JuMpS oVeR tHe LaZy DoG",
  # accents; decomposed ones: ftfy recomposes (NFC) and unescapes HTML itself unless the text has a "<",
  # so in the last one only html.unescape decodes the combining accent, which then stays decomposed
  "Café crème brûlée à la façon de Zoë",
  "naïve résumé coöperate",
  "cafe\u0301 and e&#769;t&#233;",
  "<i>e&#769;t&#233;</i>",
  "İstanbul ΣΊΣΥΦΟΣ STRASSE ß ẞ",
  # other scripts, combining marks that are not letters
  "一只猫在草地上奔跑",
  "東京タワーの夜景、きれいですね。",
  "서울의 밤 풍경",
  "Привет, мир! Как дела?",
  "مرحبا بالعالم",
  "שָׁלוֹם עוֹלָם",
  "नमस्ते दुनिया",
  "สวัสดีครับ ยินดีต้อนรับ",
  # emoji
  "a dog 🐶 playing with a ball ⚽️",
  "👨‍👩‍👧‍👦 family picnic 🧺 under 🌳🌳🌳",
  "flags 🇯🇵🇫🇷 and skin tones 👋🏽 keycap 1️⃣",
  # HTML entities, single and double escaped
  "fish &amp; chips",
  "I &lt;3 you",
  "it&#39;s a &quot;quoted&quot; word",
  "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;",
  "non&nbsp;breaking&nbsp;space &copy; 2024 &eacute;t&eacute; &#x1F600;",
  # whitespace
  "  lots   of\tspace\n\nand newlines  ",
  "nbsp\u00a0em\u2003space ideographic\u3000space",
  "zero\u200bwidth soft\u00adhyphen",
  "tabs\tbetween\twords\vvertical\fformfeed",
  # punctuation, contractions
  "Hello, world!!! ... ?!? ;-) :)",
  "don't won't it's they're we've I'm you'll he'd",
  "DON'T WON'T IT'S",
  "rock'n'roll ''quoted'' 's 'sup",
  "a--b__c c++ & c# e-mail@example.com",
  "https://example.com/path?x=1&y=2#frag",
  "(parentheses) [brackets] {braces} <angles>",
  "“smart quotes” ‘single’ — em dash – en dash … ellipsis",
  # mojibake ftfy repairs
  "cafÃ© â€œquotedâ€\x9d",
  # numbers
  "1234567890",
  "3.14159 and -2.5e10",
  "1,000,000 people in 2024",
  "1st 2nd 3rd 4th",
  "½ ¼ x² y³ Ⅻ ٣٤٥ ४२",
  "ＡＢＣ　１２３ fullwidth",
  "∑ x_i ≤ ∞ ≈ π",
  # the specials as literal text
  "<start_of_text>",
  "a<end_of_text>b",
  "!<start_of_text> and <START_OF_TEXT>",
  "<|endoftext|> <|startoftext|> hi",
  # control characters
  "bell\x07 null\x00 escape\x1b[0m",
  # long: over 77 tokens, and the 75/76-token boundary
  "supercalifragilisticexpialidocious" * 8,
  "a " * 75,
  "a " * 76,
  "a " * 200,
  (
    "A majestic dragon flying over a medieval castle at dawn, cinematic lighting, volumetric fog, "
    "ultra realistic, 8k, trending on artstation, by greg rutkowski and alphonse mucha, golden hour, "
    "dramatic clouds, epic composition, intricate details, sharp focus, octane render"
  )
  * 2,
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("clip_vocab"))
  tk.write_vocab_files(_reference.open_clip_bpe_path(), d)
  return d


@pytest.fixture(scope="module")
def tokenizer(vocab_dir):
  return tk.load_tokenizer(vocab_dir)


@pytest.fixture(scope="module")
def reference():
  return _reference.open_clip_tokenizer_module()


def test_prompts_cover_the_edge_cases(reference):
  lengths = [len(reference._tokenizer.encode(p)) for p in PROMPTS]
  assert len(PROMPTS) >= 50
  assert sum(n + 2 > tk.CONTEXT_LENGTH for n in lengths) >= 4  # truncated
  assert 75 in lengths and 76 in lengths  # the boundary: exactly 77 with SOT/EOT, and one over


def test_ids_equal_open_clip(tokenizer, reference):
  got = tokenizer(PROMPTS)
  want = reference.tokenize(PROMPTS).numpy()
  assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
  mismatched = [
    (p, got[i].tolist(), want[i].tolist()) for i, p in enumerate(PROMPTS) if not np.array_equal(got[i], want[i])
  ]
  assert not mismatched, mismatched[:3]


def test_ids_equal_open_clip_on_random_unicode(tokenizer, reference):
  pool = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "àéîõüçñßøæœÅÉÎ̧́̈ΑβΓδЖжЯя你好世界日本語カタカナひらがな한국어ابتثअआइ।๑๒ก่ 😀👍🏽🇺🇸‍️½²٣"
    "\u00a0\u2003\u200b\u3000"
  )
  rng = random.Random(0)
  texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(300)]
  texts += ["&" + rng.choice(["amp;", "lt;", "gt;", "#39;", "quot;", "amp;amp;", "#x41;"]) + t for t in texts[:50]]
  np.testing.assert_array_equal(tokenizer(texts), reference.tokenize(texts).numpy())


def test_single_string_and_layout(tokenizer):
  ids = tokenizer("")
  assert ids.tolist() == [[tk.START_ID, tk.END_ID] + [tk.PAD_ID] * 75]
  long = tokenizer(["a " * 200])[0]
  assert long[0] == tk.START_ID and long[-1] == tk.END_ID and (long[1:-1] == 320).all()  # "a</w>" = 320


def test_vocab_files_equal_open_clip_vocabulary(vocab_dir, reference):
  with open(os.path.join(vocab_dir, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  want = dict(reference._tokenizer.encoder)
  want[tk.HF_START] = want.pop("<start_of_text>")
  want[tk.HF_END] = want.pop("<end_of_text>")
  assert vocab == want
  with open(os.path.join(vocab_dir, "merges.txt"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines[0].startswith("#version") and len(lines) - 1 == tk.NUM_MERGES == 48894
  assert [tuple(m.split()) for m in lines[1:]] == sorted(
    reference._tokenizer.bpe_ranks, key=reference._tokenizer.bpe_ranks.get
  )


def test_load_rejects_a_foreign_vocabulary(tmp_path):
  (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, tk.HF_START: 3, tk.HF_END: 4}))
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
  with pytest.raises(ValueError, match="not open_clip's CLIP vocabulary"):
    tk.load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    tk.load_tokenizer(str(tmp_path / "nowhere"))


def test_module_imports_no_torch(vocab_dir):
  code = (
    "import sys; from vinf_jax import tokenizer as t; t.load_tokenizer(sys.argv[1])(['a cat']); "
    "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code, vocab_dir], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_byte_tokenizer():
  tok = tk.ByteTokenizer()
  ids = tok(["", "Hi  There", "é", "x" * 100])
  assert ids.dtype == np.int32 and ids.shape == (4, 77)
  assert ids[0].tolist() == [tk.START_ID, tk.END_ID] + [0] * 75
  assert ids[1, :10].tolist() == [tk.START_ID, *(1 + b for b in b"hi there"), tk.END_ID]
  assert ids[2, :4].tolist() == [tk.START_ID, 1 + 0xC3, 1 + 0xA9, tk.END_ID]
  assert ids[3, 0] == tk.START_ID and ids[3, -1] == tk.END_ID and (ids[3, 1:-1] == 1 + ord("x")).all()
  assert ids.max() <= tk.END_ID and ids[:, 1:].max(initial=0) <= tk.END_ID
  np.testing.assert_array_equal(tok(["Hi  There"]), tk.ByteTokenizer()(["hi there"]))


def test_truncation_counts_what_is_dropped(tokenizer):
  """75 ids fit between SOT and EOT: the rest are what the text encoder never reads (issue 25)."""
  assert tk.truncation(tokenizer, ["a " * 75, "a " * 76, "a " * 200, "a cat"]) == [(75, 0), (76, 1), (200, 125), (2, 0)]
  long = "a " * 90
  ids = tokenizer([long])[0]
  assert ids.tolist() == tokenizer(["a " * 75])[0].tolist()  # the 15 dropped ids change nothing
  byte = tk.ByteTokenizer()
  assert tk.truncation(byte, ["x" * 100, "é"]) == [(100, 25), (2, 0)]
  assert byte.encode(["Hi"]) == [[1 + ord("h"), 1 + ord("i")]]
  assert tk.truncation(lambda texts: None, ["x"]) is None  # a tokenizer that cannot count
