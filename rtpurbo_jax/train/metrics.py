"""Training metrics: JSONL (always), TensorBoard summaries (tensorboardX when installed), and
a tqdm progress bar with loss, KL and tokens/s. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import time

from rtpurbo_jax.files import atomic_write

log = logging.getLogger(__name__)


class MetricsLogger:
  """Writes `<workdir>/metrics/<stage>.jsonl` and TensorBoard events under `<workdir>/tb/<stage>`.

  `step(step, metrics)` is called every step (cheap: updates the bar); every `log_every`
  steps (and the last) the metrics are written with wall time and tokens/s.
  """

  def __init__(self, workdir: str, stage: str, *, total_steps: int, start_step: int = 0,
               tokens_per_step: int = 0, log_every: int = 10, progress: bool = True):
    import jax
    self.stage, self.total, self.every = stage, total_steps, max(1, log_every)
    self.tokens_per_step = tokens_per_step
    self.main = jax.process_index() == 0
    self._t0 = time.perf_counter()
    self._last_t, self._last_step, self._data_s = self._t0, start_step, 0.0
    self._file = self._tb = self._bar = None
    if not self.main:
      return
    os.makedirs(os.path.join(workdir, "metrics"), exist_ok=True)
    path = os.path.join(workdir, "metrics", f"{stage}.jsonl")
    truncate_after(path, start_step)
    self._file = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      # TensorBoard drops the earlier events at steps >= purge_step: those after the
      # checkpoint this run resumed from, logged by the run that was killed. The suffix keeps
      # two runs started within one second from writing one file name (the later would
      # truncate the earlier's events) and sorts in start order.
      self._tb = SummaryWriter(os.path.join(workdir, "tb", stage), purge_step=start_step + 1,
                               filename_suffix=f".{time.time_ns()}")
    except ImportError:
      log.warning("tensorboardX is not installed: metrics go to JSONL only")
    if progress:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True)

  def step(self, step: int, metrics, *, data_seconds: float = 0.0) -> dict | None:
    """Record the metrics after `step` steps; returns the written record on log steps.

    data_seconds: host time this step waited for its batch; logged as the mean per step
    (`data_seconds_per_step`, part of `seconds_per_step`), so a slow input pipeline shows.
    """
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
    self._data_s += data_seconds
    if step % self.every and step != self.total:
      return None
    now = time.perf_counter()
    rec = {k: float(v) for k, v in metrics.items()}
    dt = now - self._last_t
    if self.tokens_per_step and step > self._last_step and dt > 0:
      rec["tokens_per_s"] = self.tokens_per_step * (step - self._last_step) / dt
    rec["seconds_per_step"] = dt / max(step - self._last_step, 1)
    rec["data_seconds_per_step"] = self._data_s / max(step - self._last_step, 1)
    self._last_t, self._last_step, self._data_s = now, step, 0.0
    if not self.main:
      return rec
    self._file.write(json.dumps({"stage": self.stage, "step": step, "time": time.time(),
                                 **rec}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in rec.items():
        self._tb.add_scalar(f"{self.stage}/{k}", v, step)
      self._tb.flush()
    if self._bar is not None:
      show = {k: f"{rec[k]:.4g}" for k in ("loss", "kl", "recall", "tokens_per_s") if k in rec}
      self._bar.set_postfix(show, refresh=False)
    return rec

  def close(self):
    for obj in (self._bar, self._tb, self._file):
      if obj is not None:
        obj.close()
    self._file = self._tb = self._bar = None


def truncate_after(path: str, step: int) -> None:
  """Keep the records of `path` up to `step` (the restored checkpoint), so a resumed run
  does not log the steps between that checkpoint and the kill twice. A torn last line (a
  kill mid-write) goes too."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      continue
  if len(keep) == len(lines):
    return
  atomic_write(path, "".join(keep))


def read_metrics(path: str) -> list[dict]:
  """The records of one JSONL metrics file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
