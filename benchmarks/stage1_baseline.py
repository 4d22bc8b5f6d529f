"""The stage-1 loss as it was before the stacked single-pass rewrite (the "before" of
`benchmarks/stage1_speed.py`, and the oracle its CPU smoke mode checks the current loss
against on a fixed batch).

Per retrieval layer: a first pass for the teacher's log-sum-exp (`causal_lse`), then a scan
over query chunks forming every chunk's teacher and indexer rows over the whole sequence,
with the block top-p statistics on every query row.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels import reference as ref
from rtpurbo_jax.attention import indexer as indexer_lib

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class TeacherActs:
  """What stage 1 needs from one layer of the frozen model, for its retrieval heads only.

  q_pre, q: [batch, seq, n_ret, head_dim] the head's query before / after RoPE.
  k_pre, k: [batch, seq, n_ret, head_dim] the key of the head's KV head, before / after RoPE.
  lse: [batch, n_queries, n_ret] float32 log-sum-exp of the teacher's causal attention logits
    (q . k / sqrt(head_dim)) at the loss's query positions (a first pass), so the loss can
    form the teacher's probabilities chunk by chunk.
  """

  layer: int
  q_pre: jax.Array
  k_pre: jax.Array
  q: jax.Array
  k: jax.Array
  lse: jax.Array


jax.tree_util.register_dataclass(TeacherActs, data_fields=["q_pre", "k_pre", "q", "k", "lse"],
                                 meta_fields=["layer"])


def causal_lse(q, k, queries, *, chunk: int) -> jax.Array:
  """Log-sum-exp over causal keys of q . k / sqrt(d), at the given query positions.

  q, k: [batch, seq, heads, d] (one key head per query head); queries: int32 [n] positions
  (-1 = padding, treated as position 0). Returns [batch, n, heads] float32. Chunked over the
  queries: memory O(seq x chunk).
  """
  b, s, h, d = q.shape
  n = queries.shape[0]
  chunk = min(chunk, n)
  n_chunks = -(-n // chunk)
  qidx = jnp.pad(jnp.maximum(queries, 0), (0, n_chunks * chunk - n)).reshape(n_chunks, chunk)
  kf = k.astype(jnp.float32)
  key_pos = jnp.arange(s)

  def one(qc):
    qq = jnp.take(q, qc, axis=1).astype(jnp.float32)
    z = jnp.einsum("bqhd,bkhd->bhqk", qq, kf) / math.sqrt(d)
    z = jnp.where(key_pos[None, :] <= qc[:, None], z, NEG_INF)
    return jax.nn.logsumexp(z, axis=-1)  # [b, h, c]

  lse = jax.lax.map(one, qidx)  # [n_chunks, b, h, c]
  lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, n_chunks * chunk)[:, :, :n]
  return jnp.transpose(lse, (0, 2, 1))


def teacher_acts(model, input_ids, queries, *, chunk: int = 512) -> list[TeacherActs]:
  """Run the frozen (dense) model and collect each retrieval layer's TeacherActs.

  input_ids: [batch, seq] int32 (contiguous positions 0..seq-1); queries: int32 [n] the
  query positions the loss will use (the teacher log-sum-exp is computed only there).
  Layers after the last one with retrieval heads are not run. Every output is wrapped in
  `stop_gradient`.
  """
  b, s = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  inv_freq = model.inv_freq()
  ret_layers = [i for i, l in enumerate(model.layers) if l.attn.heads.retrieval]
  out = []
  if not ret_layers:
    return out
  x = jnp.take(model.embed[...], input_ids, axis=0)
  for i, layer in enumerate(model.layers[:ret_layers[-1] + 1]):
    heads = layer.attn.heads
    if heads.retrieval:
      q_pre, k_pre, q, k, _ = layer.attn.project_qkv(layer.input_norm(x), positions, inv_freq)
      ret = jnp.asarray(heads.retrieval)
      kv = jnp.asarray([heads.kv_of(h) for h in heads.retrieval])
      q_pre, q = q_pre[:, :, ret], q[:, :, ret]
      k_pre, k = k_pre[:, :, kv], k[:, :, kv]
      lse = causal_lse(q, k, queries, chunk=chunk)
      out.append(jax.tree.map(jax.lax.stop_gradient, TeacherActs(i, q_pre, k_pre, q, k, lse)))
    if i < ret_layers[-1]:
      x, _ = layer(x, positions, inv_freq)
  return out


def stage1_layer(wq, wk, acts: TeacherActs, queries, *, chunk: int, top_p: float,
                 block_size: int):
  """Per-head sums over queries of KL(teacher attention || softmax(indexer scores)).

  wq, wk: [n_ret, r, head_dim] (the only differentiable inputs). queries: int32 [n] query
  positions (-1 = padding, ignored), the ones `acts.lse` was computed at.
  Returns a dict of [batch, n_ret] sums over queries: kl, recall (teacher mass inside the
  indexer's top-p block set), fraction (selected causal blocks), oracle_fraction (blocks the
  teacher's own top-p needs), and count.
  """
  b, s, h, d = acts.q.shape
  bs = block_size
  s_pad = -(-s // bs) * bs
  nb = s_pad // bs
  ki = indexer_lib.project(wk, acts.k_pre)  # [b, s, h, r]: grads reach W_k here
  kf = acts.k.astype(jnp.float32)
  n = queries.shape[0]
  chunk = min(chunk, n)
  n_chunks = -(-n // chunk)
  qidx = jnp.pad(queries, (0, n_chunks * chunk - n), constant_values=-1)
  qidx = qidx.reshape(n_chunks, chunk)
  lses = jnp.pad(acts.lse, ((0, 0), (0, n_chunks * chunk - n), (0, 0)))
  lses = jnp.moveaxis(lses.reshape(b, n_chunks, chunk, h), 1, 0)  # [n_chunks, b, c, h]
  key_pos = jnp.arange(s)

  def body(carry, xs):
    qc, lse = xs
    safe = jnp.maximum(qc, 0)
    q = jnp.take(acts.q, safe, axis=1).astype(jnp.float32)  # [b, c, h, d]
    qi = indexer_lib.project(wq, jnp.take(acts.q_pre, safe, axis=1))  # [b, c, h, r]
    lse = jnp.transpose(lse, (0, 2, 1))[..., None]  # [b, h, c, 1]
    z = jnp.einsum("bqhd,bkhd->bhqk", q, kf) / math.sqrt(d)  # teacher logits [b, h, c, s]
    sc = indexer_lib.scores(qi, ki)  # indexer logits [b, h, c, s]
    # Padding queries (-1) act as query 0 so that no row is empty (an empty row would give
    # -inf log-sum-exp and NaN gradients); their terms are zeroed below.
    vis = key_pos[None, :] <= safe[:, None]  # [c, s]
    a = jnp.where(vis, jnp.exp(z - lse), 0.0)  # teacher attention
    lse_s = jax.nn.logsumexp(jnp.where(vis, sc, NEG_INF), axis=-1)  # [b, h, c]
    # KL = sum_j a_j (log a_j - log p_j) with log a_j = z_j - lse, log p_j = s_j - lse_s.
    kl = jnp.sum(jnp.where(vis, a * ((z - lse) - sc), 0.0), axis=-1) + lse_s
    real = (qc >= 0)[None, None, :]
    kl = jnp.where(real, kl, 0.0)
    stats = _selection_stats(jax.lax.stop_gradient(sc), jax.lax.stop_gradient(z), a, vis, qc,
                             top_p, bs, s_pad, nb)
    stats = {k: jnp.sum(jnp.where(real, v, 0.0), axis=-1) for k, v in stats.items()}
    sums = {"kl": jnp.sum(kl, axis=-1), **stats,
            "count": jnp.broadcast_to(jnp.sum(real, axis=-1), (b, h)).astype(jnp.float32)}
    return jax.tree.map(jnp.add, carry, sums), None

  zero = jnp.zeros((b, h), jnp.float32)
  init = {k: zero for k in ("kl", "recall", "fraction", "oracle_fraction", "count")}
  sums, _ = jax.lax.scan(jax.checkpoint(body), init, (qidx, lses))
  return sums


def _selection_stats(sc, z, a, vis, qc, top_p, bs, s_pad, nb):
  """Block top-p (the docs/DESIGN.md §1 contract) of the indexer and of the teacher per query."""
  pad = ((0, 0), (0, 0), (0, 0), (0, s_pad - sc.shape[-1]))
  vis_p = jnp.broadcast_to(jnp.pad(vis, ((0, 0), (0, s_pad - vis.shape[-1]))),
                           sc.shape[:2] + (vis.shape[0], s_pad))
  own = jnp.broadcast_to(jnp.maximum(qc, 0) // bs, sc.shape[:3])
  lm_i, ok = ref.block_logmass(jnp.pad(sc, pad), vis_p, bs)
  lm_t, _ = ref.block_logmass(jnp.pad(z, pad), vis_p, bs)
  sel_i = ref.topp_from_block_logmass(lm_i, ok, own, top_p)
  sel_t = ref.topp_from_block_logmass(lm_t, ok, own, top_p)
  t_mass = jnp.pad(a, pad).reshape(a.shape[:3] + (nb, bs)).sum(-1)
  n_ok = jnp.maximum(jnp.sum(ok, axis=-1), 1)
  return {"recall": jnp.sum(jnp.where(sel_i, t_mass, 0.0), axis=-1),
          "fraction": jnp.sum(sel_i, axis=-1) / n_ok,
          "oracle_fraction": jnp.sum(sel_t, axis=-1) / n_ok}


def stage1_loss(indexer: dict, acts: list[TeacherActs], queries, *, chunk: int, top_p: float,
                block_size: int):
  """Stage-1 objective over all retrieval heads.

  indexer: {layer: (W_q [n_ret, r, d], W_k [n_ret, r, d])}; acts from `teacher_acts` with
  the same `queries`.
  Per sequence the loss is the sum over retrieval heads of the head's KL averaged over the
  query positions (heads train independently). Returns (loss_sum over the batch, weight =
  batch size, metric sums: per-sequence means over heads and queries of kl, recall, fraction,
  oracle_fraction).
  """
  if not acts:
    raise ValueError("the head plan has no retrieval heads: stage 1 has nothing to train")
  loss = 0.0
  tot = {k: 0.0 for k in ("kl", "recall", "fraction", "oracle_fraction")}
  n_heads = 0
  for a in acts:
    wq, wk = indexer[a.layer]
    sums = stage1_layer(wq, wk, a, queries, chunk=chunk, top_p=top_p, block_size=block_size)
    cnt = jnp.maximum(sums["count"], 1.0)
    loss = loss + jnp.sum(sums["kl"] / cnt)
    for k in tot:
      tot[k] = tot[k] + jnp.sum(sums[k] / cnt)  # summed over batch and heads
    n_heads += a.q.shape[2]
  batch = acts[0].q.shape[0]
  metrics = {k: v / n_heads for k, v in tot.items()}
  return loss, jnp.asarray(batch, jnp.float32), metrics
