"""HeadPlan: which query heads of each layer are retrieval heads, and what follows from it.

The plan is over *query* heads. A KV head keeps a full cache iff at least one of its query
heads is a retrieval head; otherwise it keeps only sinks + window (docs/DESIGN.md §1).

Stored in the HF `config.json` as `headwise_config`, the format RTP-LLM reads:
  {"<layer>": [0/1 per query head], "sink_token_num": 4, "swa_token_num": 8192,
   "seqlen_threshold": 16384}
plus this project's keys `indexer_dim`, `top_p`, `block_size`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig

_PLAN_KEYS = ("sink_token_num", "swa_token_num", "seqlen_threshold", "indexer_dim", "top_p",
              "block_size")


@dataclasses.dataclass(frozen=True)
class LayerHeads:
  """Static head partition of one layer (hashable: used as a static jit argument)."""

  retrieval: tuple[int, ...]  # query heads
  local: tuple[int, ...]  # query heads
  full_kv: tuple[int, ...]  # KV heads with a full cache
  ring_kv: tuple[int, ...]  # KV heads with only sinks + window
  group_size: int

  def kv_of(self, q_head: int) -> int:
    return q_head // self.group_size

  def full_slot(self, q_head: int) -> int:
    """Index of this query head's KV head inside the full cache."""
    return self.full_kv.index(self.kv_of(q_head))

  def ring_slot(self, q_head: int) -> int:
    return self.ring_kv.index(self.kv_of(q_head))


@dataclasses.dataclass(frozen=True)
class HeadPlan:
  """retrieval[l][h] is True iff query head h of layer l is a retrieval head."""

  retrieval: tuple[tuple[bool, ...], ...]
  num_kv_heads: int

  @classmethod
  def from_mask(cls, mask, num_kv_heads: int) -> "HeadPlan":
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
      raise ConfigError(f"a head plan mask must be [layers, heads], got shape {m.shape}")
    if m.shape[1] % num_kv_heads:
      raise ConfigError(f"plan has {m.shape[1]} heads per layer, not a multiple of "
                        f"{num_kv_heads} KV heads")
    return cls(tuple(tuple(bool(x) for x in row) for row in m), num_kv_heads)

  @classmethod
  def all_local(cls, cfg: ModelConfig) -> "HeadPlan":
    return cls.from_mask(np.zeros((cfg.num_layers, cfg.num_heads), bool), cfg.num_kv_heads)

  @classmethod
  def all_retrieval(cls, cfg: ModelConfig) -> "HeadPlan":
    return cls.from_mask(np.ones((cfg.num_layers, cfg.num_heads), bool), cfg.num_kv_heads)

  @classmethod
  def from_scores(cls, scores, num_kv_heads: int, ratio: float) -> "HeadPlan":
    """Top `ratio` of all query heads of the model by score (global ranking, rounded down,
    at least one); ties go to the earlier (layer, head)."""
    s = np.asarray(scores, np.float64)
    n = max(1, int(np.floor(ratio * s.size + 1e-9)))
    order = np.argsort(-s.reshape(-1), kind="stable")[:n]
    mask = np.zeros(s.size, bool)
    mask[order] = True
    return cls.from_mask(mask.reshape(s.shape), num_kv_heads)

  @property
  def num_layers(self) -> int:
    return len(self.retrieval)

  @property
  def num_heads(self) -> int:
    return len(self.retrieval[0])

  def mask(self) -> np.ndarray:
    return np.asarray(self.retrieval, bool)

  def layer(self, layer: int) -> LayerHeads:
    row = self.retrieval[layer]
    g = self.num_heads // self.num_kv_heads
    ret = tuple(h for h, r in enumerate(row) if r)
    loc = tuple(h for h, r in enumerate(row) if not r)
    full = tuple(sorted({h // g for h in ret}))
    ring = tuple(k for k in range(self.num_kv_heads) if k not in full)
    return LayerHeads(ret, loc, full, ring, g)

  def check(self, cfg: ModelConfig) -> None:
    if (self.num_layers, self.num_heads) != (cfg.num_layers, cfg.num_heads):
      raise ConfigError(
          f"head plan is {self.num_layers} layers x {self.num_heads} heads but the model has "
          f"{cfg.num_layers} x {cfg.num_heads}")
    if self.num_kv_heads != cfg.num_kv_heads:
      raise ConfigError(f"head plan assumes {self.num_kv_heads} KV heads, model has "
                        f"{cfg.num_kv_heads}")

  def summary(self) -> dict:
    m = self.mask()
    full = sum(len(self.layer(l).full_kv) for l in range(self.num_layers))
    return {
        "retrieval_heads": int(m.sum()),
        "query_heads": int(m.size),
        "retrieval_fraction": float(m.mean()),
        "full_kv_heads": full,
        "kv_heads": self.num_layers * self.num_kv_heads,
        "per_layer": [int(r.sum()) for r in m],
    }

  # -- headwise_config I/O -------------------------------------------------

  def to_headwise_config(self, sparse: SparseConfig) -> dict:
    d = {str(l): [int(x) for x in row] for l, row in enumerate(self.retrieval)}
    d.update(sink_token_num=sparse.sinks, swa_token_num=sparse.window,
             seqlen_threshold=sparse.seqlen_threshold, indexer_dim=sparse.indexer_dim,
             top_p=sparse.top_p, block_size=sparse.block_size)
    return d

  @classmethod
  def from_headwise_config(cls, d: dict, num_kv_heads: int) -> tuple["HeadPlan", dict]:
    """Returns (plan, sparse_overrides) where the overrides are SparseConfig fields.

    Every value is checked (one ConfigError naming the field): layer lists of 0/1 (or
    true/false) of one length, integer settings, top_p a number in (0, 1].
    """
    if not isinstance(d, dict):
      raise ConfigError(f"headwise_config must be a JSON object, got {type(d).__name__}")
    layers = sorted((k for k in d if str(k).isdigit()), key=int)
    if not layers:
      raise ConfigError("headwise_config has no per-layer head lists")
    if [int(k) for k in layers] != list(range(len(layers))):
      raise ConfigError(f"headwise_config layers must be 0..N-1, got {layers}")
    rows = [_head_flags(k, d[k]) for k in layers]
    if len({len(r) for r in rows}) != 1:
      raise ConfigError("headwise_config layers list different numbers of heads: "
                        f"{[len(r) for r in rows]}")
    plan = cls.from_mask(rows, num_kv_heads)
    names = {"sink_token_num": "sinks", "swa_token_num": "window",
             "seqlen_threshold": "seqlen_threshold", "indexer_dim": "indexer_dim",
             "top_p": "top_p", "block_size": "block_size"}
    overrides = {names[k]: _setting(k, d[k]) for k in _PLAN_KEYS if k in d}
    return plan, overrides


def _head_flags(layer: str, row) -> list[bool]:
  """One layer's 0/1 list; anything else (2, -1, 0.5, "1", a nested list) is an error."""
  if not isinstance(row, list):
    raise ConfigError(f"headwise_config[{layer!r}] must be a list of 0/1, got "
                      f"{type(row).__name__}")
  for h, x in enumerate(row):
    if isinstance(x, bool) or (type(x) is int and x in (0, 1)):
      continue
    raise ConfigError(f"headwise_config[{layer!r}][{h}]={x!r}: must be 0 or 1")
  return [bool(x) for x in row]


def _setting(key: str, v):
  """A headwise_config setting: top_p a number in (0, 1], the others non-negative ints."""
  if key == "top_p":
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
      raise ConfigError(f"headwise_config {key}={v!r}: must be a number in (0, 1]")
    return float(v)
  if isinstance(v, bool) or type(v) is not int or v < 0:
    raise ConfigError(f"headwise_config {key}={v!r}: must be a non-negative integer")
  return v


def load_headwise_config(path: str) -> dict:
  """headwise_config from a model folder's config.json or a JSON file (a JSON object, with
  the plan at its top level or under "headwise_config"). A plan file whose calibration
  scores are not finite is refused: it came from a broken run."""
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no head plan at {path}")
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not JSON ({e})") from None
  if not isinstance(d, dict):
    raise ConfigError(f"{path}: a head plan file must be a JSON object with a "
                      f"headwise_config, got a {type(d).__name__}")
  if "scores" in d and not _finite(d["scores"]):
    raise ConfigError(f"{path}: the calibration scores are not finite (NaN / inf): delete "
                      "the file and calibrate again")
  return d.get("headwise_config", d)


def _finite(scores) -> bool:
  try:
    return bool(np.isfinite(np.asarray(scores, np.float64)).all())
  except (TypeError, ValueError):  # ragged or not numbers
    return False


def read_plan(path: str, num_kv_heads: int) -> tuple["HeadPlan", dict]:
  """(plan, sparse overrides) of a plan file or model folder; errors name the file."""
  d = load_headwise_config(path)
  try:
    return HeadPlan.from_headwise_config(d, num_kv_heads)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
