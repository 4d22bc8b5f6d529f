"""Server metrics: counters and gauges kept by the engine thread, read by `/metrics`.

Written by one thread (the scheduler's; `rejected` and `received` by HTTP handlers under the
lock); readers take a `snapshot()`, a plain dict. `render_prometheus` gives the Prometheus
text exposition format (names prefixed `rtpurbo_`).

  tokens_per_second     generated tokens over the last `window_s` seconds (every slot)
  selected_fraction     retrieval heads' selected share of causal blocks in decode, averaged
                        over the active rows of each decode step: the last step's and the mean
                        over all steps (absent for dense / streaming models: no selection)
  prefill_selected_fraction  the same for sparse prefill (absent unless sparse_prefill)
"""

from __future__ import annotations

import collections
import threading
import time

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class Metrics:

  def __init__(self, slots: int, window_s: float = 10.0):
    self.slots = int(slots)
    self.window_s = float(window_s)
    self.lock = threading.Lock()
    self.started = time.time()
    self._t0 = time.perf_counter()
    self.received = 0
    self.rejected = 0  # answered with a 4xx / 503 before reaching the queue
    self.finished = dict.fromkeys(FINISH_REASONS, 0)
    self.prompt_tokens = 0
    self.generated_tokens = 0
    self.queue_depth = 0
    self.slots_used = 0
    self.slots_decoding = 0
    self.decode_steps = 0
    self.prefill_chunks = 0
    self.ttft_sum = self.ttft_count = 0.0
    self.e2e_sum = self.e2e_count = 0.0
    self.frac_last = None
    self.frac_sum = self.frac_count = 0.0
    self.prefill_blocks = [0.0, 0.0]
    self._recent = collections.deque()  # (time, tokens)

  # -- updates -------------------------------------------------------------------------------

  def count_received(self) -> None:
    with self.lock:
      self.received += 1

  def count_rejected(self) -> None:
    with self.lock:
      self.rejected += 1

  def add_tokens(self, n: int) -> None:
    now = time.perf_counter()
    with self.lock:
      self.generated_tokens += n
      self._recent.append((now, n))
      self._trim(now)

  def observe_ttft(self, seconds: float) -> None:
    with self.lock:
      self.ttft_sum += seconds
      self.ttft_count += 1

  def finish(self, reason: str, seconds: float) -> None:
    with self.lock:
      self.finished[reason] = self.finished.get(reason, 0) + 1
      if reason in ("stop", "length"):
        self.e2e_sum += seconds
        self.e2e_count += 1

  def add_selected_fraction(self, frac: float | None) -> None:
    if frac is None:
      return
    with self.lock:
      self.frac_last = frac
      self.frac_sum += frac
      self.frac_count += 1

  def add_prefill_blocks(self, blocks) -> None:
    with self.lock:
      self.prefill_blocks[0] += float(blocks[0])
      self.prefill_blocks[1] += float(blocks[1])

  def _trim(self, now: float) -> None:
    while self._recent and self._recent[0][0] < now - self.window_s:
      self._recent.popleft()

  # -- reads ---------------------------------------------------------------------------------

  def snapshot(self) -> dict:
    now = time.perf_counter()
    with self.lock:
      self._trim(now)
      span = max(min(self.window_s, now - self._t0), 1e-9)
      sel, causal = self.prefill_blocks
      return {
          "uptime_s": time.time() - self.started,
          "requests_received": self.received,
          "requests_rejected": self.rejected,
          "requests_finished": dict(self.finished),
          "requests_running": self.slots_used,
          "queue_depth": self.queue_depth,
          "slots_total": self.slots,
          "slots_used": self.slots_used,
          "slots_decoding": self.slots_decoding,
          "slot_occupancy": self.slots_used / self.slots,
          "prompt_tokens": self.prompt_tokens,
          "generated_tokens": self.generated_tokens,
          "tokens_per_second": sum(n for _, n in self._recent) / span,
          "decode_steps": self.decode_steps,
          "prefill_chunks": self.prefill_chunks,
          "ttft_mean_s": self.ttft_sum / self.ttft_count if self.ttft_count else None,
          "e2e_mean_s": self.e2e_sum / self.e2e_count if self.e2e_count else None,
          "selected_fraction_last": self.frac_last,
          "selected_fraction_mean": (self.frac_sum / self.frac_count if self.frac_count
                                     else None),
          "prefill_selected_fraction": sel / causal if causal else None,
      }


_HELP = {
    "requests_received": ("counter", "Completion requests received"),
    "requests_rejected": ("counter", "Requests refused before queueing (4xx, queue full)"),
    "requests_running": ("gauge", "Requests holding a slot"),
    "queue_depth": ("gauge", "Requests waiting for a slot"),
    "slots_total": ("gauge", "Sequence slots of the KV cache"),
    "slots_used": ("gauge", "Slots holding a request"),
    "slots_decoding": ("gauge", "Slots past prefill"),
    "slot_occupancy": ("gauge", "slots_used / slots_total"),
    "prompt_tokens": ("counter", "Prompt tokens admitted"),
    "generated_tokens": ("counter", "Tokens generated"),
    "tokens_per_second": ("gauge", "Generated tokens per second over the recent window"),
    "decode_steps": ("counter", "Batched decode steps"),
    "prefill_chunks": ("counter", "Prefill chunks"),
    "ttft_mean_s": ("gauge", "Mean time to first token (s)"),
    "e2e_mean_s": ("gauge", "Mean request latency, submit to last token (s)"),
    "selected_fraction_last": ("gauge", "Selected share of causal blocks, last decode step"),
    "selected_fraction_mean": ("gauge", "Selected share of causal blocks, mean over steps"),
    "prefill_selected_fraction": ("gauge", "Selected share of causal blocks in sparse prefill"),
    "uptime_s": ("gauge", "Seconds since the server started"),
}


def render_prometheus(snap: dict) -> str:
  """The snapshot in the Prometheus text format; absent values (None) are left out."""
  lines = []
  fin = snap["requests_finished"]
  lines += ["# HELP rtpurbo_requests_finished Requests finished, by reason",
            "# TYPE rtpurbo_requests_finished counter"]
  lines += [f'rtpurbo_requests_finished{{reason="{r}"}} {n}' for r, n in sorted(fin.items())]
  for key, (kind, text) in _HELP.items():
    v = snap.get(key)
    if v is None:
      continue
    lines += [f"# HELP rtpurbo_{key} {text}", f"# TYPE rtpurbo_{key} {kind}",
              f"rtpurbo_{key} {float(v):.6g}" if isinstance(v, float) else f"rtpurbo_{key} {v}"]
  return "\n".join(lines) + "\n"
