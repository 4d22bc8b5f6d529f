"""Text in and out of the server: tokenizer adapter, chat prompts, incremental detokenizing,
stop strings.

`Codec` wraps either a `transformers` tokenizer (the model's; chat prompts use its chat
template) or, for random-weight models that have none, `train.data.ByteTokenizer` (UTF-8
bytes + 3; a plain `<|role|>` chat layout).

`TextStream` turns a request's growing list of generated ids into text deltas:
  - detokenizing is incremental (a window of recent ids, as vLLM does) and holds back text
    that ends in an incomplete UTF-8 sequence (U+FFFD) until the next token completes it;
  - text that could be the start of a stop string is held back too; when a stop string
    appears the text is cut before it and the stream reports it.
The deltas concatenate to the final text, so streaming and non-streaming responses (both
built from the same deltas) are equal.
"""

from __future__ import annotations

import dataclasses

REPLACEMENT = "\ufffd"


class Codec:
  """encode / decode / chat for one tokenizer. `eos_ids`: ids that end a generation."""

  def __init__(self, tokenizer, *, vocab_size: int, extra_eos: tuple[int, ...] = ()):
    self.tok = tokenizer
    self.vocab_size = int(vocab_size)
    self.hf = hasattr(tokenizer, "apply_chat_template")
    eos = set(int(e) for e in extra_eos)
    e = getattr(tokenizer, "eos_token_id", None)
    if e is not None:
      eos.update(e if isinstance(e, (list, tuple)) else (e,))
    self.eos_ids = tuple(sorted(i for i in eos if 0 <= i < self.vocab_size))

  @classmethod
  def bytes(cls, vocab_size: int) -> "Codec":
    from rtpurbo_jax.train.data import ByteTokenizer

    if vocab_size < ByteTokenizer.vocab_size:
      raise ValueError(f"the byte tokenizer needs a vocabulary of >= "
                       f"{ByteTokenizer.vocab_size} ids; the model has {vocab_size}")
    return cls(ByteTokenizer(), vocab_size=vocab_size)

  @property
  def name(self) -> str:
    return "bytes" if not self.hf else type(self.tok).__name__

  def encode(self, text: str) -> list[int]:
    """A completion prompt (the tokenizer's special tokens, e.g. bos, included)."""
    if self.hf:
      return [int(i) for i in self.tok(text)["input_ids"]]
    return self.tok.encode(text)

  def encode_chat(self, messages: list[dict]) -> list[int]:
    """A chat prompt ending where the assistant's answer starts."""
    if self.hf and getattr(self.tok, "chat_template", None):
      text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
      return [int(i) for i in self.tok(text, add_special_tokens=False)["input_ids"]]
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    return self.encode(text)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.hf:
      return self.tok.decode(ids, skip_special_tokens=True)
    # A random-weight model may emit ids past the 259 byte ids: they carry no text.
    return self.tok.decode([i for i in ids if i < self.tok.vocab_size])


@dataclasses.dataclass
class TextStream:
  """Deltas of the text of one generation. `push(token)` returns the text now safe to send;
  `finish()` the rest. `stopped` is set once a stop string appeared (the text ends before
  it; later pushes are not allowed)."""

  codec: Codec
  stop: tuple[str, ...] = ()
  ids: list = dataclasses.field(default_factory=list)
  text: str = ""  # detokenized so far (complete characters only)
  sent: int = 0  # characters of `text` already returned
  stopped: bool = False
  _prefix: int = 0  # ids[_prefix:_read] decode to the context of the next delta
  _read: int = 0

  def push(self, token: int) -> str:
    assert not self.stopped
    self.ids.append(int(token))
    # Decode a window: the previous few tokens give the context (spaces, merged bytes).
    before = self.codec.decode(self.ids[self._prefix:self._read])
    after = self.codec.decode(self.ids[self._prefix:])
    if len(after) > len(before) and not after.endswith(REPLACEMENT):
      self.text += after[len(before):]
      self._prefix, self._read = self._read, len(self.ids)
    return self._release(final=False)

  def finish(self) -> str:
    """The remaining text (an incomplete character at the very end is kept as U+FFFD)."""
    if not self.stopped:
      tail = self.codec.decode(self.ids[self._prefix:])
      head = self.codec.decode(self.ids[self._prefix:self._read])
      self.text += tail[len(head):]
      self._prefix = self._read = len(self.ids)
    return self._release(final=True)

  def _release(self, final: bool) -> str:
    if self.stopped:
      return ""
    if self.stop:
      # A stop string cannot start before `sent`: text that could begin one is held back.
      hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
      if hits:
        cut = min(hits)
        self.text = self.text[:cut]
        self.stopped = True
        out, self.sent = self.text[self.sent:], cut
        return out
    end = len(self.text)
    if not final and self.stop:
      end -= _held_back(self.text[self.sent:], self.stop)
    out, self.sent = self.text[self.sent:end], end
    return out


def _held_back(pending: str, stops: tuple[str, ...]) -> int:
  """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
  best = 0
  for s in stops:
    for n in range(min(len(s) - 1, len(pending)), best, -1):
      if pending.endswith(s[:n]):
        best = n
        break
  return best
