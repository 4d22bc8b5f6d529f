"""Training and evaluation data: local text sources, tokenisation, packing, grain pipelines,
and synthetic passkey / multi-key documents (and needle filler) over real filler text.

Sources are local files only: `.txt` (one document per file), `.jsonl` (one record per line:
`{"text": ...}`, `{"prompt": ..., "response": ...}` or `{"messages": [{"role", "content"}]}`).
Records are read lazily by byte range, so a large corpus costs an index, not its text.

Pipelines are grain datasets whose iterators are checkpointable (`get_state` / `set_state`
are JSON data, stored in the training checkpoint). Every pipeline is deterministic given its
seed, and shards its records over processes (`jax.process_index()` / `process_count()`).

Shapes: packed LM batches {"ids": int32 [batch, seq_len]}; stage-2 examples
{"ids": int32 [seq_len], "valid": bool [seq_len], "labels": bool [seq_len]}.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import zlib
from typing import Any, Callable, Sequence

import numpy as np

def state_from_json(state):
  """A grain iterator state read back from JSON, with its tuples restored.

  JSON has lists only, and grain compares some state fields with tuples: the packing
  iterator's empty remainder is `(-1, -1)`, so `[-1, -1]` restores as a remainder that does
  not exist and the stream resumes at the wrong place.
  """
  if isinstance(state, dict):
    return {k: state_from_json(v) for k, v in state.items()}
  if isinstance(state, list):
    return tuple(state_from_json(v) for v in state)
  return state


# ---------------------------------------------------------------------------
# Tokenisers: anything with `encode(text) -> list[int]`; two self-contained ones for tests.


class DataError(ValueError):
  """Bad data input (missing files, empty sources, unreadable records)."""


class ByteTokenizer:
  """UTF-8 bytes shifted by 3: 0 = pad, 1 = bos, 2 = eos. vocab_size 259; exact round trip."""

  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


class HashTokenizer:
  """Words and punctuation hashed (crc32, stable across runs) into [3, vocab_size)."""

  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
  _WORD = re.compile(r"\w+|[^\w\s]")

  def __init__(self, vocab_size: int = 4096):
    if vocab_size <= 3:
      raise DataError(f"HashTokenizer needs vocab_size > 3, got {vocab_size}")
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    return [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in self._WORD.findall(text)]


class TokenFn:
  """A uniform view of a tokenizer: `encode(text)` without special tokens, `eos_id`, `bos_id`.

  Accepts this module's tokenizers, a `transformers` tokenizer, or any callable
  text -> list[int]. With `vocab_size` every encoded id must be below it (the model's
  embedding rows): an id beyond the vocabulary is a `DataError`, not NaN losses later.
  """

  def __init__(self, tok: Any, vocab_size: int | None = None, name: str = ""):
    self.tok = tok
    self.vocab_size, self.name = vocab_size, name or type(tok).__name__
    self.eos_id = _first_id(getattr(tok, "eos_token_id", None))
    self.bos_id = _first_id(getattr(tok, "bos_token_id", None))
    self.check_ids([i for i in (self.eos_id, self.bos_id) if i is not None])

  def encode(self, text: str) -> list[int]:
    tok = self.tok
    if hasattr(tok, "encode"):
      try:
        ids = tok.encode(text, add_special_tokens=False)
      except TypeError:
        ids = tok.encode(text)
    elif callable(tok):
      ids = tok(text)
    else:
      raise DataError(f"tokenizer {type(tok).__name__} has no encode() and is not callable")
    if isinstance(ids, dict):  # a transformers BatchEncoding called directly
      ids = ids["input_ids"]
    ids = [int(i) for i in ids]
    self.check_ids(ids)
    return ids

  def check_ids(self, ids) -> None:
    """DataError if an id is negative or not below `vocab_size` (when set)."""
    if self.vocab_size is None or not len(ids):
      return
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= self.vocab_size:
      bad = hi if hi >= self.vocab_size else lo
      raise DataError(f"tokenizer {self.name!r} gives token id {bad} outside the model's "
                      f"vocabulary (vocab_size={self.vocab_size}): set data.tokenizer to the "
                      "model's tokenizer")

  def decode(self, ids) -> str:
    if hasattr(self.tok, "decode"):
      return self.tok.decode([int(i) for i in ids])
    raise DataError(f"tokenizer {type(self.tok).__name__} cannot decode")


def _first_id(x):
  if isinstance(x, (list, tuple)):
    return int(x[0]) if x else None
  return None if x is None else int(x)


def get_tokenizer(name: str, model_path: str = "", vocab_size: int | None = None) -> TokenFn:
  """'byte' | 'hash' | 'hash:<vocab>' | a tokenizer folder or registered model name.

  "" means the model's own tokenizer (`rtpurbo_jax.load_tokenizer(model_path)`).
  vocab_size: the model's; encoded ids at or above it raise DataError (`TokenFn`).
  """
  if name == "byte":
    return TokenFn(ByteTokenizer(), vocab_size, name)
  if name == "hash" or name.startswith("hash:"):
    return TokenFn(HashTokenizer(int(name.split(":")[1]) if ":" in name else 4096),
                   vocab_size, name)
  path = name or model_path
  if not path:
    raise DataError("no tokenizer: set data.tokenizer ('byte', 'hash:<vocab>' or a path) or "
                    "config.model_path")
  import rtpurbo_jax
  return TokenFn(rtpurbo_jax.load_tokenizer(path), vocab_size, path)


# ---------------------------------------------------------------------------
# Local sources.


def expand_files(spec: str | Sequence[str]) -> list[str]:
  """Comma-separated paths / globs (or a list) -> sorted existing files; a clear error when
  a pattern matches nothing. The name `shakespeare` stands for the plays of
  `rtpurbo_jax.assets` (fetched into the user cache on first use) except the held-out ones
  (`assets.HELDOUT_PLAYS`), which `shakespeare-heldout` names."""
  parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
  parts = [p for p in parts if p]
  if not parts:
    raise DataError("no data files given (set data.train_files to paths or globs, "
                    "comma-separated)")
  out = []
  for p in parts:
    if p in ("shakespeare", "shakespeare-heldout"):
      from rtpurbo_jax import assets
      out.extend(assets.shakespeare_files("train" if p == "shakespeare" else "heldout"))
      continue
    hits = sorted(glob.glob(os.path.expanduser(p)))
    hits = [h for h in hits if os.path.isfile(h)]
    if not hits:
      raise DataError(f"data file {p!r} not found (no file matches)")
    out.extend(hits)
  return out


class TextSource:
  """Random-access records of local `.txt` / `.jsonl` files (a grain data source).

  Record i is a dict: {"text"} or {"prompt", "response"}. Only byte offsets are kept in
  memory; the text is read when a record is requested.
  """

  def __init__(self, files: str | Sequence[str], *, text_key: str = "text",
               prompt_key: str = "prompt", response_key: str = "response"):
    self.files = expand_files(files)
    self.text_key, self.prompt_key, self.response_key = text_key, prompt_key, response_key
    self._index: list[tuple[int, int, int]] = []  # (file, start, end)
    for fi, path in enumerate(self.files):
      if path.endswith(".jsonl"):
        with open(path, "rb") as f:
          pos = 0
          for line in f:
            if line.strip():
              self._index.append((fi, pos, pos + len(line)))
            pos += len(line)
      elif path.endswith(".txt") or path.endswith(".md"):
        size = os.path.getsize(path)
        if size:
          self._index.append((fi, 0, size))
      else:
        raise DataError(f"{path}: unsupported data file type (use .txt or .jsonl)")
    if not self._index:
      raise DataError(f"data files {self.files} hold no non-empty records")

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> dict:
    fi, start, end = self._index[int(i)]
    path = self.files[fi]
    with open(path, "rb") as f:
      f.seek(start)
      raw = f.read(end - start).decode("utf-8", errors="replace")
    if not path.endswith(".jsonl"):
      return {"text": raw}
    try:
      rec = json.loads(raw)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} at byte {start}: not a JSON line ({e})") from None
    return self._normalise(rec, path, start)

  def _normalise(self, rec, path, start) -> dict:
    if isinstance(rec, str):
      return {"text": rec}
    if not isinstance(rec, dict):
      raise DataError(f"{path} at byte {start}: a record must be an object or a string")
    if self.prompt_key in rec and self.response_key in rec:
      return {"prompt": str(rec[self.prompt_key]), "response": str(rec[self.response_key])}
    if "messages" in rec:
      msgs = rec["messages"]
      if not msgs or msgs[-1].get("role") != "assistant":
        raise DataError(f"{path} at byte {start}: 'messages' must end with an assistant turn")
      prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant: "
      return {"prompt": prompt, "response": str(msgs[-1]["content"])}
    if self.text_key in rec:
      return {"text": str(rec[self.text_key])}
    raise DataError(f"{path} at byte {start}: record has none of the keys "
                    f"{self.text_key!r}, ({self.prompt_key!r}, {self.response_key!r}), "
                    f"'messages' (keys: {sorted(rec)})")


def record_text(rec: dict) -> str:
  return rec["text"] if "text" in rec else rec["prompt"] + rec["response"]


def _process_shard(ds, process_index: int | None, process_count: int | None):
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if process_count > 1:
    if len(ds) < process_count:
      raise DataError(f"{len(ds)} records cannot be sharded over {process_count} processes")
    ds = ds[process_index::process_count]
  return ds


# ---------------------------------------------------------------------------
# Packed LM stream (stage 1, plain LM fine-tuning).


def packed_dataset(source, tokenizer: TokenFn, seq_len: int, batch_size: int, *, seed: int,
                   add_eos: bool = True, process_index: int | None = None,
                   process_count: int | None = None):
  """Documents shuffled (a new order every epoch), tokenised, EOS-separated, concatenated
  and split into windows of `seq_len` tokens; batches {"ids": int32 [batch_size, seq_len]}.

  Endless (epochs repeat). The returned grain IterDataset's iterators are checkpointable.
  """
  import grain
  from grain import experimental as gx

  if seq_len < 1 or batch_size < 1:
    raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
  eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []

  def tokenize(rec):
    return {"ids": np.asarray(tokenizer.encode(record_text(rec)) + eos, np.int32)}

  ds = grain.MapDataset.source(source)
  ds = _process_shard(ds, process_index, process_count)
  ds = ds.shuffle(seed=seed).repeat(None).map(tokenize)
  it = ds.to_iter_dataset()
  it = gx.ConcatThenSplitIterDataset(it, length_struct={"ids": seq_len})
  it = it.map(lambda ex: {"ids": ex["ids"].astype(np.int32)})
  return it.batch(batch_size, drop_remainder=True)


# ---------------------------------------------------------------------------
# Labelled examples (stage 2): prompt + response, or text with its last tokens as labels.


def make_example(rec: dict, tokenizer: TokenFn, seq_len: int, label_tokens: int) -> dict:
  """One right-padded example of `seq_len` tokens.

  prompt/response: ids = prompt + response (+ eos), truncated from the left so the response
  survives; labels = response positions. text: the first `seq_len` tokens, labels = the last
  `label_tokens` of them. Returns {"ids" int32 [S], "valid" bool [S], "labels" bool [S]}.
  """
  if "response" in rec:
    p = tokenizer.encode(rec["prompt"])
    r = tokenizer.encode(rec["response"])
    if tokenizer.eos_id is not None:
      r = r + [tokenizer.eos_id]
    r = r[:seq_len - 1] if p else r[:seq_len]
    ids = (p + r)[-seq_len:]
    return _labelled(ids, seq_len, len(r))
  return text_example(tokenizer.encode(rec["text"]), 0, seq_len, label_tokens)


def text_example(ids: Sequence[int], start: int, seq_len: int, label_tokens: int) -> dict:
  """The text example of tokens ids[start:start + seq_len]: labels = its last `label_tokens`
  tokens (never its first), right padding when the text ends early."""
  ids = list(ids[start:start + seq_len])
  return _labelled(ids, seq_len, min(label_tokens, max(len(ids) - 1, 0)))


def _labelled(ids: list[int], seq_len: int, n_label: int) -> dict:
  n = len(ids)
  out_ids = np.zeros(seq_len, np.int32)
  out_ids[:n] = ids
  valid = np.arange(seq_len) < n
  labels = valid & (np.arange(seq_len) >= n - n_label)
  return {"ids": out_ids, "valid": valid, "labels": labels}


class ExampleSource:
  """Random-access stage-2 examples over a TextSource (deterministic per index).

  windows=False: one example per record (a text's first `seq_len` tokens). windows=True: a
  text record gives one example per whole `seq_len`-token window (consecutive, not
  overlapping; the partial tail is dropped unless the text is shorter than one window), so a
  long document is used in full and examples are rarely padded. prompt/response records give
  one example either way. Windows are counted by tokenising every record once at
  construction; tokenised texts are kept in a small cache for the reads that follow.
  """

  def __init__(self, source, tokenizer: TokenFn, seq_len: int, label_tokens: int, *,
               windows: bool = False):
    self.source, self.tokenizer = source, tokenizer
    self.seq_len, self.label_tokens = seq_len, label_tokens
    self._spans: list[tuple[int, int]] | None = None  # (record, first token) per example
    if windows:
      self._spans = []
      for r in range(len(source)):
        rec = source[r]
        if "response" in rec:
          self._spans.append((r, -1))
          continue
        n = len(self._text_ids(r))
        self._spans.extend((r, k * seq_len) for k in range(max(n // seq_len, 1)))

  @functools.lru_cache(maxsize=64)
  def _text_ids(self, r: int) -> list[int]:
    return self.tokenizer.encode(self.source[r]["text"])

  def __len__(self):
    return len(self.source) if self._spans is None else len(self._spans)

  def __getitem__(self, i):
    if self._spans is None:
      return make_example(self.source[int(i)], self.tokenizer, self.seq_len, self.label_tokens)
    r, start = self._spans[int(i)]
    if start < 0:
      return make_example(self.source[r], self.tokenizer, self.seq_len, self.label_tokens)
    return text_example(self._text_ids(r), start, self.seq_len, self.label_tokens)


class SpreadSubset:
  """`n` records of `source` spread evenly over it (first and last included), so a capped
  data set still samples every part of the corpus, not only its first files."""

  def __init__(self, source, n: int):
    if not 0 < n <= len(source):
      raise DataError(f"cannot take {n} of {len(source)} examples")
    self.source = source
    self.index = np.unique(np.round(np.linspace(0, len(source) - 1, n)).astype(np.int64))

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i):
    return self.source[int(self.index[int(i)])]


def indexed_dataset(num: int, load: Callable[[int], dict], batch_size: int, *, seed: int,
                    process_index: int | None = None, process_count: int | None = None):
  """Records 0..num-1 in a seeded order (new every epoch), `load(i)` each, batched.

  Batches are dicts of arrays with a leading [batch_size] axis; endless and checkpointable.
  """
  import grain

  ds = grain.MapDataset.range(num)
  ds = _process_shard(ds, process_index, process_count)
  ds = ds.shuffle(seed=seed).repeat(None).map(load)
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


# ---------------------------------------------------------------------------
# Synthetic documents over real filler text (calibration and evaluation).


def filler_tokens(tokenizer: TokenFn, filler_text: str, n: int, seed: int) -> list[int]:
  """`n` tokens of filler text starting at a seeded character offset (wrapping around)."""
  if not filler_text.strip():
    raise DataError("filler text is empty")
  rng = np.random.default_rng(seed)
  start = int(rng.integers(0, len(filler_text)))
  out: list[int] = []
  pos, step = start, 16384
  while len(out) < n:
    piece = filler_text[pos:pos + step]
    if len(piece) < step:  # wrap around the end of the text
      piece += filler_text[:step - len(piece)]
    out.extend(tokenizer.encode(piece))
    pos = (pos + step) % len(filler_text)
  return out[:n]
