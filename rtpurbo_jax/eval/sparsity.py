"""Decode sparsity of the retrieval heads: blocks selected, tokens attended, attention recall.

`selection_report` replays a sequence through the model in its own mode (the prefill a cache
would hold) and, at sampled query positions t, applies the decode selection of every
selected head (indexer block top-p, or top-k, `select.per_query_selection`). Per selected
head and query it measures:
  fraction  selected blocks / causal blocks (ceil((t + 1) / block_size)), as decode sows it
  tokens    causal tokens inside the selected blocks
  recall    the exact attention mass (full head_dim, RoPE, 1/sqrt(d), causal softmax) that
            falls inside the selected blocks
and the compute sparsity over all query heads of the model, 1 - attended / (heads x (t + 1)),
where a local head attends min(t + 1, sinks + window) tokens.

`decode_fractions` reads the `SelectionStats` that real decode steps sow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtpurbo_jax.attention import routing as routing_lib
from rtpurbo_jax.attention.select import per_query_selection


def query_positions(length: int, count: int, seed: int) -> np.ndarray:
  """`count` sorted distinct positions in the second half of [0, length), the last included."""
  rng = np.random.default_rng([seed, length, count])
  lo = length // 2
  pool = np.arange(lo, length - 1)
  pick = rng.choice(pool, size=min(count - 1, len(pool)), replace=False) if count > 1 else []
  return np.unique(np.concatenate([np.asarray(pick, np.int64), [length - 1]])).astype(np.int32)


def _layer_stats(attn, x_norm, positions, inv_freq, qpos, sparse_configs):
  """{i: (fraction, tokens, recall)} for each sparse config, each [batch, n_ret, n_queries].

  The exact attention and the indexer projections are shared; only the selection differs.
  """
  sel = attn.routing.selected
  q_pre, k_pre, q, k, _ = attn.project_qkv(x_norm, positions, inv_freq)
  qi, ki = attn.indexer_qk(q_pre, k_pre)
  b, s = positions.shape
  bs = sparse_configs[0].block_size
  s_pad = -(-s // bs) * bs
  nb = s_pad // bs
  pos_q = positions[:, qpos]  # [b, nq]
  ret = jnp.asarray(sel.heads)
  kv = jnp.asarray(sel.kv)
  qq = q[:, qpos][:, :, ret].astype(jnp.float32)  # [b, nq, h, d]
  kk = k[:, :, kv].astype(jnp.float32)  # [b, s, h, d]
  logits = jnp.einsum("bqhd,bkhd->bhqk", qq, kk) / math.sqrt(q.shape[-1])
  causal = positions[:, None, None, :] <= pos_q[:, None, :, None]
  probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
  probs = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, s_pad - s)))
  block_mass = probs.reshape(*probs.shape[:-1], nb, bs).sum(-1)
  # Causal tokens per block for each query: clip(t + 1 - block_start, 0, block_size).
  per_block = jnp.clip(pos_q[:, None, :, None] + 1 - jnp.arange(nb) * bs, 0, bs)
  causal_blocks = pos_q // bs + 1
  out = {}
  for i, sp in enumerate(sparse_configs):
    bias = attn.distance_bias if sp.distance_buckets else None
    mask = per_query_selection(qi[:, qpos], ki, pos_q, positions, sp, s_pad,
                               bias=bias)  # [b, h, nq, nb]
    recall = jnp.sum(jnp.where(mask, block_mass, 0.0), axis=-1)
    tokens = jnp.sum(jnp.where(mask, per_block, 0), axis=-1).astype(jnp.float32)
    fraction = jnp.sum(mask, axis=-1) / causal_blocks[:, None, :]
    out[i] = (fraction, tokens, recall)
  return out


def _make_report_fn(model, sparse_configs):
  graphdef, state = nnx.split(model)
  layers = [i for i, l in enumerate(model.layers) if l.attn.routing.selected]

  @jax.jit
  def run(state, ids, qpos):
    m = nnx.merge(graphdef, state)
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = jnp.take(m.embed[...], ids, axis=0)
    inv_freq = m.inv_freq()
    out = {}
    for i, layer in enumerate(m.layers):
      if i > layers[-1]:
        break  # later layers cannot change what the retrieval heads see
      if i in layers:
        out[i] = _layer_stats(layer.attn, layer.input_norm(x), positions, inv_freq, qpos,
                              sparse_configs)
      x, _ = layer(x, positions, inv_freq)
    return out

  return lambda ids, qpos: run(state, ids, qpos)


def selection_reports(models: dict, ids, qpos) -> dict:
  """`selection_report` for several selecting models of one plan and one prefill (rtpurbo and
  topk): one forward pass (through the first model), each model's own selection rule.

  Returns {name: report}.
  """
  names = list(models)
  first = models[names[0]]
  for name, m in models.items():
    if not routing_lib.selects_blocks(m.sparse.mode):
      raise ValueError(f"selection_report needs mode rtpurbo or topk, got {m.sparse.mode!r}")
    if m.plan != first.plan or m.sparse.block_size != first.sparse.block_size:
      raise ValueError(f"model {name!r} has another plan or block size than {names[0]!r}")
  if not any(l.attn.routing.selected for l in first.layers):
    raise ValueError("the model's plan has no retrieval heads")
  ids = jnp.asarray(ids, jnp.int32)
  qpos = jnp.asarray(np.asarray(qpos), jnp.int32)
  configs = tuple(models[n].sparse for n in names)
  raw = jax.device_get(_make_report_fn(first, configs)(ids, qpos))
  ctx = np.asarray(qpos, np.float64) + 1
  reports = {}
  for i, name in enumerate(names):
    heads, frac, tok, rec = [], [], [], []
    for layer, per_config in sorted(raw.items()):
      f, t, r = per_config[i]
      for j, h in enumerate(first.layers[layer].attn.routing.selected.heads):
        heads.append({"layer": int(layer), "head": int(h), "fraction": float(f[:, j].mean()),
                      "tokens": float(t[:, j].mean()), "recall": float(r[:, j].mean()),
                      "recall_min": float(r[:, j].min())})
        frac.append(f[:, j])
        tok.append(t[:, j])
        rec.append(r[:, j])
    frac, tok, rec = np.stack(frac), np.stack(tok), np.stack(rec)  # [heads, batch, nq]
    reports[name] = {
        "mode": models[name].sparse.mode,
        "query_positions": [int(x) for x in np.asarray(qpos)],
        "mean_context": float(ctx.mean()),
        "selected_fraction": float(frac.mean()),
        "sparsity": float(1.0 - frac.mean()),
        "tokens_per_head": float(tok.mean()),
        "recall": float(rec.mean()),
        "recall_p10": float(np.percentile(rec.mean(axis=1), 10)),
        "compute_sparsity": compute_sparsity(models[name], tok.mean(axis=(0, 1)), ctx),
        "heads": heads,
    }
  return reports


def selection_report(model, ids, qpos) -> dict:
  """Decode-selection statistics of `model` (mode rtpurbo or topk) on `ids` [batch, seq].

  qpos: int positions to query (e.g. `query_positions`). Returns a JSON-ready dict with
  per-head means ("heads": [{layer, head, fraction, tokens, recall, recall_min}]) and overall
  means (selected_fraction, sparsity, tokens_per_head, recall, recall_p10, compute_sparsity).
  """
  return selection_reports({"model": model}, ids, qpos)["model"]


def compute_sparsity(model, retrieval_tokens, ctx) -> float:
  """1 - attended / (query heads x context) over all query heads, averaged over queries.

  retrieval_tokens: [n_queries] mean tokens a selected head attends; ctx: [n_queries] t + 1.
  A local head attends min(ctx, sinks + window) tokens, a dense head ctx.
  """
  sp, cfg = model.sparse, model.cfg
  ctx = np.asarray(ctx, np.float64)
  total = cfg.num_layers * cfg.num_heads
  routes = [layer.attn.routing for layer in model.layers]
  tokens = {"selected": np.asarray(retrieval_tokens),
            "local": np.minimum(ctx, sp.sinks + sp.window), "dense": ctx}
  attended = np.zeros_like(ctx)
  for group, per_head in tokens.items():
    n = sum(len(getattr(r, group)) for r in routes)
    if n:
      attended = attended + n * per_head
  return float(np.mean(1.0 - attended / (total * ctx)))


def decode_fractions(stats) -> dict[int, np.ndarray]:
  """{layer: selected fraction per retrieval head [n_ret]} from one decode step's sown
  `SelectionStats` (as `nnx.capture` returns them, or their `nnx.to_pure_dict`)."""
  d = stats if isinstance(stats, dict) else nnx.to_pure_dict(stats)
  out = {}
  for layer, sub in (d.get("layers") or {}).items():
    vals = sub.get("attn", {}).get("selected_fraction")
    if vals is not None:
      out[int(layer)] = np.mean(np.stack([np.asarray(v) for v in vals]), axis=0)
  return out
