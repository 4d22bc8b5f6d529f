"""Head calibration: rank every query head by its needle-retrieval score (PAPER.md §2).

One document carries the same needle span near its start and at its end. For query head h,
  R_h = mean over later-needle tokens t of sum over earlier-needle keys j of A_h(t, j),
with A_h the post-softmax attention of the dense model. Only the |needle| x S rows of the later
needle are computed per layer (never S x S); the forward itself runs the model's dense
attention. All query heads of the model are ranked globally; the top `retrieval_ratio` become
retrieval heads (HeadPlan.from_scores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ConfigError


def make_needle_document(doc_tokens, needle_tokens, length: int, offset: int = 16):
  """[doc[:offset], needle, doc..., needle] of exactly `length` tokens.

  The earlier needle starts at `offset` (not at 0, so attention-sink mass on the first tokens
  does not count as retrieval). Returns (ids [length] int32, (start, end) of the earlier needle).
  """
  doc = np.asarray(doc_tokens, np.int32)
  needle = np.asarray(needle_tokens, np.int32)
  n = len(needle)
  body = length - 2 * n - offset
  if body < 1:
    raise ConfigError(f"needle document of {length} tokens cannot hold two {n}-token needles "
                      f"after an offset of {offset}")
  if len(doc) < offset + body:
    raise ConfigError(f"need {offset + body} document tokens, got {len(doc)}")
  ids = np.concatenate([doc[:offset], needle, doc[offset:offset + body], needle])
  return ids.astype(np.int32), (offset, offset + n)


def _needle_rows(model, ids, pre_span, post_start):
  """Scores [layers, heads] from one dense forward. ids: [1, S]."""
  b, s = ids.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  inv_freq = model.inv_freq()
  x = jnp.take(model.embed[...], ids, axis=0)
  rows = []
  a, e = pre_span
  for layer in model.layers:
    attn = layer.attn
    h = layer.input_norm(x)
    _, _, q, k, _ = attn.project_qkv(h, positions, inv_freq)
    g = model.cfg.group_size
    qn = q[:, post_start:].astype(jnp.float32)  # [b, n, H, d]
    kh = jnp.repeat(k.astype(jnp.float32), g, axis=2)  # [b, S, H, d]
    logits = jnp.einsum("bqhd,bkhd->bhqk", qn, kh) / math.sqrt(model.cfg.head_dim)
    qpos = jnp.arange(post_start, s)[:, None]
    logits = jnp.where(jnp.arange(s)[None, :] <= qpos, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    rows.append(jnp.mean(jnp.sum(probs[..., a:e], axis=-1), axis=(0, 2)))  # [H]
    x, _ = layer(x, positions, inv_freq)
  return jnp.stack(rows)


def needle_scores(model, input_ids, needle_span) -> np.ndarray:
  """R_h for every (layer, query head): np.ndarray [layers, heads] in (0, 1)."""
  from rtpurbo_jax.convert import rebuild

  ids = jnp.asarray(input_ids, jnp.int32)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or ids.shape[0] != 1:
    raise ConfigError(f"calibrate takes one document [1, seq], got shape {tuple(ids.shape)}")
  s = ids.shape[1]
  a, e = (int(v) for v in needle_span)
  n = e - a
  if not (0 <= a < e and e <= s - n):
    raise ConfigError(f"needle span {needle_span} must lie before the later needle "
                      f"(the last {n} of {s} tokens)")
  dense = model if model.sparse.mode == "dense" else rebuild(
      model, sparse=dataclasses.replace(model.sparse, mode="dense"))
  fn = nnx.jit(_needle_rows, static_argnums=(2, 3))
  return np.asarray(fn(dense, ids, (a, e), s - n), np.float64)


def calibrate(model, input_ids, needle_span, retrieval_ratio: float = 0.15, *,
              out_dir: str | None = None):
  """Needle scores -> HeadPlan (global top `retrieval_ratio` of query heads).

  Args:
    input_ids: [seq] or [1, seq], a document whose last |needle| tokens repeat the tokens at
      `needle_span = (start, end)` (see `make_needle_document`).
    out_dir: when given, writes head_scores.json and head_scores.png (layers x heads heatmap).
  Returns: (plan, scores [layers, heads]).
  """
  if not 0.0 < retrieval_ratio <= 1.0:
    raise ConfigError(f"retrieval_ratio={retrieval_ratio} must be in (0, 1]")
  scores = needle_scores(model, input_ids, needle_span)
  plan = HeadPlan.from_scores(scores, model.cfg.num_kv_heads, retrieval_ratio)
  if out_dir:
    write_report(scores, plan, out_dir)
  return plan, scores


def write_report(scores: np.ndarray, plan: HeadPlan, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "head_scores.json"), "w") as f:
    json.dump({"scores": scores.tolist(), "retrieval": plan.mask().astype(int).tolist(),
               "summary": plan.summary()}, f, indent=1)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(max(4, scores.shape[1] * 0.45), max(3, scores.shape[0] * 0.22)))
  im = ax.imshow(scores, aspect="auto", cmap="viridis")
  ys, xs = np.nonzero(plan.mask())
  ax.scatter(xs, ys, marker="s", s=12, facecolors="none", edgecolors="red", linewidths=0.8)
  ax.set_xlabel("query head")
  ax.set_ylabel("layer")
  ax.set_title("needle retrieval score (red: retrieval heads)")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "head_scores.png"), dpi=110)
  plt.close(fig)
