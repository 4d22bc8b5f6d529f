"""Continuous batching: one engine thread owns the model; requests reach it through a queue.

The loop (`Scheduler._run`), one iteration at a time:
  1. admit: move waiting requests (FIFO) into free slots; drop cancelled ones;
  2. prefill: one chunk of the oldest admitted request that is still prefilling (one request
     at a time; its chunk after the last yields its first token, and it starts decoding);
  3. decode: one step over all slots, the decoding rows active (each at its own position);
  4. finished requests (eos / stop string / max_tokens / cancelled) free their slot at once;
     the next admission reuses it (its first prefill chunk resets the row).
Prefill chunks and decode steps alternate, so a long prompt delays running requests by at
most one chunk per token. With nothing to do the thread sleeps on the queue's condition.

Requests talk back through `Request.sink(event)`, called on the engine thread with
`Event`s: one per accepted token (text delta + token id) and a final one (finish_reason,
usage). The HTTP layer turns the sink into an asyncio queue.

Failure: an exception in a step fails every request in flight and stops the loop (the cache
may be in an unknown state); `healthy` turns False and new submissions are refused.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import secrets
import threading
import time
import traceback
from typing import Callable

import numpy as np

from rtpurbo_jax.serve.metrics import Metrics
from rtpurbo_jax.serve.slots import RowSampling, SlotModel
from rtpurbo_jax.serve.text import Codec, TextStream

log = logging.getLogger("rtpurbo_jax.serve")


class QueueFull(Exception):
  """The waiting queue holds `max_queue` requests (HTTP 503)."""


class NotServing(Exception):
  """The engine loop is not running (stopped or failed; HTTP 503)."""


class TooLong(ValueError):
  """prompt + max_tokens exceed a slot (HTTP 400)."""


@dataclasses.dataclass
class Event:
  """What the engine tells a request. `finish_reason` is set on the last event only:
  "stop" (eos or a stop string), "length" (max_tokens), "cancelled", or "error" (`error`
  holds the message)."""

  text: str = ""
  token_ids: tuple[int, ...] = ()
  finish_reason: str | None = None
  error: str | None = None
  prompt_tokens: int = 0
  completion_tokens: int = 0


@dataclasses.dataclass(eq=False)
class Request:
  """One generation. prompt_ids: non-empty token ids; stop_ids: token ids that end it (the
  tokenizer's eos unless ignored, plus any the client named); seed None = random."""

  prompt_ids: list[int]
  max_tokens: int
  sink: Callable[[Event], None]
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  stop_ids: frozenset = frozenset()
  cancelled: bool = False  # set from any thread; the engine frees the slot at its next step
  submitted: float = dataclasses.field(default_factory=time.perf_counter)

  def cancel(self) -> None:
    self.cancelled = True


def _send(req: Request, event: Event) -> None:
  """Deliver an event; a sink that fails (its client went away) cancels the request."""
  try:
    req.sink(event)
  except Exception:  # never let one client's failure stop the engine
    log.warning("dropping a request whose sink failed:\n%s", traceback.format_exc())
    req.cancel()


@dataclasses.dataclass(eq=False)
class _Slot:
  req: Request
  order: int  # admission order: prefill goes oldest first
  stream: TextStream
  sampling: RowSampling
  prefilled: int = 0  # prompt tokens written so far
  decoding: bool = False
  token: int = 0  # the last sampled token: the next decode step's input
  generated: int = 0
  first_at: float | None = None


class Scheduler:
  """Queue + slot table + the engine thread over one `SlotModel`."""

  def __init__(self, slot_model: SlotModel, codec: Codec, *, max_queue: int = 256,
               metrics: Metrics | None = None):
    if max_queue < 0:
      raise ValueError(f"max_queue={max_queue} must be >= 0")
    self.model = slot_model
    self.codec = codec
    self.max_queue = int(max_queue)
    self.metrics = metrics or Metrics(slot_model.slots)
    self.slots: list[_Slot | None] = [None] * slot_model.slots
    self._waiting: collections.deque[Request] = collections.deque()
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stop = False
    self._order = itertools.count()
    self.error: str | None = None

  # -- public, any thread --------------------------------------------------------------------

  @property
  def capacity(self) -> int:
    """Tokens per slot: prompt + max_tokens must not exceed it."""
    return self.model.max_len

  @property
  def healthy(self) -> bool:
    return self._thread is not None and self._thread.is_alive() and self.error is None

  def check(self, prompt_len: int, max_tokens: int) -> None:
    """TooLong with the numbers if a request cannot fit one slot."""
    if prompt_len + max_tokens > self.capacity:
      raise TooLong(f"this model's context per request is {self.capacity} tokens, but "
                    f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt + "
                    f"{max_tokens} max_tokens); shorten the prompt or lower max_tokens")

  def submit(self, req: Request) -> None:
    """Queue a request (raises TooLong, QueueFull or NotServing; never blocks)."""
    if not req.prompt_ids:
      raise ValueError("the prompt is empty")
    if req.max_tokens < 1:
      raise ValueError(f"max_tokens={req.max_tokens} must be >= 1")
    self.check(len(req.prompt_ids), req.max_tokens)
    with self._cond:
      if not self.healthy or self._stop:
        raise NotServing(self.error or "the engine is not running")
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue holds "
                        f"{self.max_queue}); retry later")
      self._waiting.append(req)
      self.metrics.queue_depth = len(self._waiting)
      self._cond.notify()

  def start(self) -> None:
    if self._thread is not None:
      raise RuntimeError("the scheduler was started already")
    self._thread = threading.Thread(target=self._run, name="rtpurbo-engine", daemon=True)
    self._thread.start()

  def stop(self, timeout: float | None = 30.0) -> None:
    """Stop the loop; requests still queued or in slots get a "cancelled" final event."""
    with self._cond:
      self._stop = True
      self._cond.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  # -- engine thread -------------------------------------------------------------------------

  def _run(self) -> None:
    try:
      while True:
        with self._cond:
          if self._stop:
            break
          self._admit()
          busy = any(self.slots)
          if not busy:
            self._cond.wait(0.5)
            continue
        self._step()
    except Exception as e:  # a failed step: the cache may be half-written
      self.error = f"engine step failed: {type(e).__name__}: {e}"
      log.error("%s\n%s", self.error, traceback.format_exc())
      self._fail_all("error", self.error)
      return
    self._fail_all("cancelled", None)

  def _admit(self) -> None:
    """Under the lock: waiting requests into free slots (cancelled ones are dropped)."""
    while self._waiting:
      if self._waiting[0].cancelled:
        self._final(self._waiting.popleft(), "cancelled", None)
        continue
      free = next((i for i, s in enumerate(self.slots) if s is None), None)
      if free is None:
        break
      req = self._waiting.popleft()
      seed = req.seed if req.seed is not None else secrets.randbits(32)
      self.slots[free] = _Slot(req, next(self._order), TextStream(self.codec, req.stop),
                               RowSampling(req.temperature, req.top_k, req.top_p, seed))
      self.metrics.prompt_tokens += len(req.prompt_ids)
    self.metrics.queue_depth = len(self._waiting)

  def _step(self) -> None:
    for i, s in enumerate(self.slots):
      if s is not None and s.req.cancelled:
        self._release(i, "cancelled")
    pending = [(s.order, i) for i, s in enumerate(self.slots) if s and not s.decoding]
    if pending:
      self._prefill_chunk(min(pending)[1])
    if any(s and s.decoding for s in self.slots):
      self._decode_step()
    m = self.metrics
    m.slots_used = sum(s is not None for s in self.slots)
    m.slots_decoding = sum(bool(s and s.decoding) for s in self.slots)

  def _prefill_chunk(self, i: int) -> None:
    s = self.slots[i]
    ids = s.req.prompt_ids
    c = self.model.chunk
    tok, blocks = self.model.prefill(i, ids[s.prefilled:s.prefilled + c], s.prefilled,
                                     len(ids), s.sampling)
    s.prefilled += c
    self.metrics.prefill_chunks += 1
    self.metrics.add_prefill_blocks(blocks)
    if tok is not None:
      s.decoding = True
      s.first_at = time.perf_counter()
      self.metrics.observe_ttft(s.first_at - s.req.submitted)
      self._accept(i, tok)

  def _decode_step(self) -> None:
    n = self.model.slots
    tokens, positions = np.zeros(n, np.int32), np.zeros(n, np.int32)
    active, steps = np.zeros(n, bool), np.zeros(n, np.int32)
    sampling = [RowSampling()] * n
    for i, s in enumerate(self.slots):
      if s is not None and s.decoding:
        # The last token sits right after the prompt and the tokens before it.
        tokens[i], positions[i] = s.token, len(s.req.prompt_ids) + s.generated - 1
        active[i], steps[i], sampling[i] = True, s.generated, s.sampling
    nxt, frac = self.model.decode(tokens, positions, active, sampling, steps)
    self.metrics.decode_steps += 1
    self.metrics.add_selected_fraction(frac)
    for i in np.flatnonzero(active):
      self._accept(int(i), int(nxt[i]))

  def _accept(self, i: int, tok: int) -> None:
    """A new token of slot i: send its text, or finish the request."""
    s = self.slots[i]
    s.token = tok
    s.generated += 1
    self.metrics.add_tokens(1)
    if tok in s.req.stop_ids:
      self._release(i, "stop", (tok,))
      return
    text = s.stream.push(tok)
    if s.stream.stopped:
      self._release(i, "stop", (tok,), text)
    elif s.generated >= s.req.max_tokens:
      self._release(i, "length", (tok,), text)
    else:
      _send(s.req, Event(text, (tok,)))

  def _release(self, i: int, reason: str, token_ids=(), text: str = "") -> None:
    """Finish slot i's request and free the slot."""
    s = self.slots[i]
    self.slots[i] = None
    text += s.stream.finish()
    self._final(s.req, reason, None, text, token_ids, s.generated)

  def _final(self, req: Request, reason: str, error: str | None, text: str = "",
             token_ids=(), generated: int = 0) -> None:
    self.metrics.finish(reason, time.perf_counter() - req.submitted)
    _send(req, Event(text, tuple(token_ids), reason, error, len(req.prompt_ids), generated))

  def _fail_all(self, reason: str, error: str | None) -> None:
    with self._cond:
      waiting, self._waiting = list(self._waiting), collections.deque()
      self.metrics.queue_depth = 0
    for req in waiting:
      self._final(req, reason, error)
    for i, s in enumerate(self.slots):
      if s is not None:
        self.slots[i] = None
        self._final(s.req, reason, error, generated=s.generated)
