"""Needle calibration: score every query head by long-range retrieval, pick the top heads.

The calibration document carries the same needle span twice, near its start and at its end
(`make_needle_document`). For query head h (docs/METHOD.md Eq. 1):

  R_h = (1 / |N_post|) * sum_{t in N_post} sum_{j in N_pre} A_h(t, j)

where A_h is the post-softmax attention of the *dense* model, N_pre the earlier needle's
positions and N_post the later one's. The model runs layer by layer; at each layer only the
|N_post| rows of the later needle are scored against all keys (a softmax needs the whole row),
so memory is O(|needle| x S) per head, never O(S x S). All query heads of the model are ranked
together and the top `retrieval_ratio` become retrieval heads (`HeadPlan.from_scores`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ConfigError
from rtpurbo_jax.files import atomic_write
from rtpurbo_jax.models.transformer import Transformer


def make_needle_document(doc_tokens, needle_tokens, length: int, offset: int = 16):
  """Build `[doc[:offset], needle, doc..., needle]` of exactly `length` tokens.

  Args:
    doc_tokens: 1-D document token ids (at least `length - 2 * len(needle)` of them).
    needle_tokens: 1-D needle ids, inserted after `offset` document tokens and at the end.
    offset: document tokens before the earlier needle. Not 0 by default: the first tokens
      collect attention-sink mass in most heads, which is not retrieval.
  Returns:
    ids int32 [length] and the earlier needle's span (start, end); the later needle is the
    last end - start tokens.
  """
  doc = np.asarray(doc_tokens, np.int64).reshape(-1)
  needle = np.asarray(needle_tokens, np.int64).reshape(-1)
  n = len(needle)
  body = length - 2 * n - offset
  if n == 0:
    raise ConfigError("the needle is empty")
  if offset < 0 or body < 0:
    raise ConfigError(f"a needle document of {length} tokens cannot hold two {n}-token needles "
                      f"after an offset of {offset}")
  if len(doc) < offset + body:
    raise ConfigError(f"the document has {len(doc)} tokens; {offset + body} are needed for "
                      f"length={length} with a {n}-token needle")
  ids = np.concatenate([doc[:offset], needle, doc[offset:offset + body], needle])
  return ids.astype(np.int32), (offset, offset + n)


def _check_span(ids: np.ndarray, needle_span) -> tuple[int, int, int]:
  try:
    start, end = (int(x) for x in needle_span)
  except (TypeError, ValueError):
    raise ConfigError(f"needle span must be (start, end), got {needle_span!r}") from None
  s = len(ids)
  n = end - start
  if not (0 <= start < end and end <= s - n):
    raise ConfigError(f"needle span {needle_span} must satisfy 0 <= start < end <= seq_len - "
                      f"(end - start) = {s - n}: the earlier needle has to end before the later "
                      f"copy (the last {n} tokens) begins")
  if not np.array_equal(ids[start:end], ids[s - n:]):
    raise ConfigError(f"the last {n} tokens differ from the needle span {needle_span}; build "
                      "the document with make_needle_document")
  return start, end, n


def _dense_twin(model: Transformer) -> Transformer:
  """The same weights in dense mode with an all-local plan (every layer has the same static
  structure, so the per-layer step compiles once)."""
  from rtpurbo_jax.convert import rebuild
  plan = HeadPlan.all_local(model.cfg)
  if model.sparse.mode == "dense" and model.plan == plan:
    return model
  return rebuild(model, plan=plan, sparse=dataclasses.replace(model.sparse, mode="dense"))


def needle_rows_mass(q_rows, k, q_positions, kv_heads, span):
  """Attention mass that each query row puts on the keys in `span`.

  q_rows: [batch, n, heads, head_dim] (RoPE applied) at absolute positions q_positions [n];
  k: [batch, S, kv_heads, head_dim] (RoPE applied) at positions 0..S-1; kv_heads: static
  tuple, the KV head of each query head. Softmax over the causal keys of each row, fp32,
  scale 1/sqrt(head_dim). Returns [batch, heads, n] float32.
  """
  d = q_rows.shape[-1]
  kh = jnp.take(k, jnp.asarray(kv_heads, jnp.int32), axis=2).astype(jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", q_rows.astype(jnp.float32), kh) / math.sqrt(d)
  j = jnp.arange(k.shape[1])
  s = jnp.where(j[None, :] <= q_positions[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  in_span = (j >= span[0]) & (j < span[1])
  return jnp.sum(jnp.where(in_span, p, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _layer_step(graphdef, state, x, inv_freq, span, n):
  """One decoder layer: (next hidden states, R per query head [heads])."""
  layer = nnx.merge(graphdef, state)
  b, s = x.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  _, _, q, k, _ = layer.attn.project_qkv(layer.input_norm(x), positions, inv_freq)
  heads = layer.attn.heads
  kv_heads = tuple(heads.kv_of(h) for h in range(q.shape[2]))
  rows = jnp.arange(s - n, s, dtype=jnp.int32)
  mass = needle_rows_mass(q[:, s - n:], k, rows, kv_heads, span)  # [b, h, n]
  y, _ = layer(x, positions, inv_freq)
  return y, jnp.mean(mass, axis=(0, 2))


def needle_scores(model: Transformer, input_ids, needle_span) -> np.ndarray:
  """R_h for every query head: float64 [layers, heads] (see the module docstring).

  input_ids: [S] or [1, S]; needle_span: (start, end) of the earlier needle; the later
  needle is the last end - start tokens and must repeat it.
  """
  ids = np.asarray(input_ids)
  if ids.ndim == 2:
    if ids.shape[0] != 1:
      raise ConfigError(f"calibration takes one document, got a batch of {ids.shape[0]}")
    ids = ids[0]
  if ids.ndim != 1:
    raise ConfigError(f"input_ids must be [S] or [1, S], got shape {np.shape(input_ids)}")
  start, end, n = _check_span(ids, needle_span)
  dense = _dense_twin(model)
  x = jnp.take(dense.embed[...], jnp.asarray(ids, jnp.int32)[None], axis=0)
  inv_freq = dense.inv_freq()
  out = []
  for layer in dense.layers:
    graphdef, state = nnx.split(layer)
    x, r = _layer_step(graphdef, state, x, inv_freq, (start, end), n)
    out.append(np.asarray(r, np.float64))
  return np.stack(out)


def calibrate(model: Transformer, input_ids, needle_span, retrieval_ratio: float = 0.15, *,
              out_dir: str | None = None, name: str = "head_scores"):
  """Needle scores -> HeadPlan (global top `retrieval_ratio` of all query heads).

  Returns (plan, scores [layers, heads] float64). With `out_dir`, also writes
  `<name>.json` (scores, plan, spans) and `<name>.png` (layers x heads heatmap).
  """
  if not 0.0 < retrieval_ratio <= 1.0:
    raise ConfigError(f"retrieval_ratio={retrieval_ratio} must be in (0, 1]")
  scores = needle_scores(model, input_ids, needle_span)
  if not np.isfinite(scores).all():  # a plan ranked by NaN is arbitrary: never write one
    bad = np.argwhere(~np.isfinite(scores))[:4].tolist()
    raise FloatingPointError(f"calibration scores are not finite at (layer, head) {bad}: "
                             "check the input token ids and the model weights")
  plan = HeadPlan.from_scores(scores, model.cfg.num_kv_heads, retrieval_ratio)
  if out_dir is not None:
    s = np.asarray(input_ids).reshape(-1).shape[0]
    n = int(needle_span[1]) - int(needle_span[0])
    meta = {"seq_len": s, "needle_span": [int(needle_span[0]), int(needle_span[1])],
            "later_span": [s - n, s], "retrieval_ratio": retrieval_ratio}
    write_report(out_dir, name, scores, plan, meta)
  return plan, scores


# ---------------------------------------------------------------------------
# Outputs.


def write_report(out_dir: str, name: str, scores: np.ndarray, plan: HeadPlan,
                 meta: dict | None = None) -> tuple[str, str]:
  """Write `<name>.json` and `<name>.png` into out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  doc = dict(meta or {})
  doc.update(
      scores=[[float(v) for v in row] for row in scores],
      retrieval=[[int(v) for v in row] for row in plan.mask()],
      summary=plan.summary(),
      ranking=[[int(l), int(h), float(scores[l, h])] for l, h in
               zip(*np.unravel_index(np.argsort(-scores, axis=None, kind="stable"),
                                     scores.shape))][: int(plan.mask().sum())],
  )
  json_path = os.path.join(out_dir, f"{name}.json")
  atomic_write(json_path, (json.dumps(doc, indent=1) + "\n").encode())
  png_path = os.path.join(out_dir, f"{name}.png")
  atomic_write(png_path, heatmap_png(scores, plan, title=name))
  return json_path, png_path


def heatmap_png(scores: np.ndarray, plan: HeadPlan, title: str = "") -> bytes:
  """PNG bytes of a layers x heads heatmap of R_h; retrieval heads are outlined."""
  import io

  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  layers, heads = scores.shape
  fig = Figure(figsize=(max(4.0, 0.45 * heads + 2.0), max(3.0, 0.22 * layers + 1.5)))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  im = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")
  for l, h in zip(*np.nonzero(plan.mask())):
    ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
  ax.set_xlabel("query head")
  ax.set_ylabel("layer")
  summary = plan.summary()
  ax.set_title(f"{title}: needle score R_h ({summary['retrieval_heads']}/"
               f"{summary['query_heads']} retrieval heads outlined)", fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  return buf.getvalue()
