"""Text and tokens for the evaluation: tokenizer adapters and the Shakespeare corpus.

A codec turns text into token ids and back: `encode(text) -> list[int]`,
`decode(ids) -> str`, `encode_batch(texts) -> list[list[int]]`. No special tokens are added:
prompts are plain text completed by the model.

  ByteCodec  byte-level stub (UTF-8 bytes + an offset) for random-init models;
  HFCodec    a transformers tokenizer.

`Corpus` holds the plays as lines, split by play into a haystack part (task filler) and a
held-out part (perplexity): `rtpurbo_jax.assets.HELDOUT_PLAYS`, which the training name
`shakespeare` leaves out.
"""

from __future__ import annotations

import os
import re

import numpy as np


class ByteCodec:
  """UTF-8 bytes shifted by `offset` (ids below it are left for special tokens).

  Needs `vocab_size >= offset + 256`.
  """

  def __init__(self, offset: int = 3):
    self.offset = offset

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    raw = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.offset + 256)
    return raw.decode("utf-8", errors="replace")


class HFCodec:
  """A transformers tokenizer used without special tokens."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False))

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    if not texts:
      return []
    return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def as_codec(tokenizer):
  """A codec from a codec or a transformers tokenizer."""
  if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "decode"):
    return tokenizer
  return HFCodec(tokenizer)


def _clean_lines(text: str) -> list[str]:
  """Lines with trailing blanks removed and runs of empty lines collapsed to one."""
  out = []
  for line in text.splitlines():
    line = line.rstrip()
    if not line and (not out or not out[-1]):
      continue
    out.append(line)
  return out


# Perplexity texts (`Corpus.with_heldout`; eval.ppl_text) and how reports name them.
PPL_TEXTS = {"plays": "the held-out plays", "moby_dick": "Moby-Dick"}


class Corpus:
  """Lines of text to cut haystacks from, plus held-out lines for perplexity.

  haystack: list[str] lines of the non-held-out plays (in file-name order);
  heldout: list[str] lines of `assets.HELDOUT_PLAYS`.
  """

  def __init__(self, haystack: list[str], heldout: list[str]):
    if len(haystack) < 100:
      raise ValueError(f"the haystack corpus has only {len(haystack)} lines; need >= 100")
    self.haystack = haystack
    self.heldout = heldout
    self._vocab = None

  @classmethod
  def shakespeare(cls) -> "Corpus":
    """The plays from `rtpurbo_jax.assets` (fetched into the user cache on first use)."""
    from rtpurbo_jax import assets
    def lines(split):
      out = []
      for f in assets.shakespeare_files(split):
        with open(f, encoding="utf-8", errors="replace") as fh:
          out.extend(_clean_lines(fh.read()) + [""])
      return out

    return cls(lines("train"), lines("heldout"))

  @classmethod
  def from_text(cls, text: str, heldout_fraction: float = 0.1) -> "Corpus":
    """A corpus from one text (tests): the last `heldout_fraction` of lines is held out."""
    lines = _clean_lines(text)
    cut = int(len(lines) * (1 - heldout_fraction))
    return cls(lines[:cut], lines[cut:])

  def with_heldout(self, text: str) -> "Corpus":
    """This corpus with the perplexity text `text` (PPL_TEXTS): "plays" keeps the held-out
    lines; "moby_dick" puts `assets.moby_dick_text()` (fetched on first use) in their place.
    The haystack (task prompts) is unchanged."""
    if text == "plays":
      return self
    if text != "moby_dick":
      raise ValueError(f"perplexity text {text!r}: one of {tuple(PPL_TEXTS)}")
    from rtpurbo_jax import assets
    return Corpus(self.haystack, _clean_lines(assets.moby_dick_text()))

  def vocabulary(self) -> list[str]:
    """Sorted distinct lowercase words (4..9 letters) of the haystack: keys and CWE words."""
    if self._vocab is None:
      words = set()
      # Whole lowercase words only: no fragments of names or of elisions such as o'er.
      pattern = re.compile(r"(?<![A-Za-z'])[a-z]{4,9}(?![A-Za-z'])")
      for line in self.haystack:
        words.update(pattern.findall(line))
      self._vocab = sorted(words)
    return self._vocab

  def heldout_text(self) -> str:
    return "\n".join(self.heldout)

  def haystack_lines(self, rng: np.random.Generator, codec, n_tokens: int) -> tuple[list[str],
                                                                                  list[int]]:
    """Consecutive haystack lines (from a random start, wrapping) holding about `n_tokens`.

    Returns (lines, token count of each line + its newline); the counts sum to <= n_tokens.
    """
    start = int(rng.integers(len(self.haystack)))
    lines, counts, total, i = [], [], 0, start
    while total < n_tokens:
      # Tokenize a batch of lines at a time; the tokenizer call dominates otherwise.
      batch = [self.haystack[(i + j) % len(self.haystack)] for j in range(256)]
      i += 256
      for line, ids in zip(batch, codec.encode_batch([b + "\n" for b in batch])):
        if total + len(ids) > n_tokens:
          return lines, counts
        lines.append(line)
        counts.append(len(ids))
        total += len(ids)
    return lines, counts
