"""Training losses: stage-1 indexer KL, stage-2 top-k self-distillation KL, plain LM loss.

No loss here materialises a [seq, seq] or a [seq, vocab] array: attention rows are taken in
query chunks ([batch, heads, chunk, seq]) and logits in position chunks ([batch, chunk, k] or
[batch, chunk, vocab]); each chunk runs under `jax.checkpoint`, so the backward pass keeps
only chunk inputs and recomputes the rest (memory O(seq x chunk)).

Every loss returns `(loss_sum, weight, metric_sums)`: the trainer divides sums by the total
weight of the global batch, so gradient accumulation gives exactly the global-batch mean.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import reference as ref
from rtpurbo_jax.attention import indexer as indexer_lib

NEG_INF = -jnp.inf

# ---------------------------------------------------------------------------
# Stage 1: the teacher pass (frozen backbone, no gradient) and the indexer KL.


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


def query_positions(seq_len: int, fraction: float, min_pos: int, rng) -> jax.Array:
  """Query positions for stage 1: all of [min_pos, seq_len) when fraction >= 1, else a
  seeded uniform subset of round(fraction * (seq_len - min_pos)) of them (sorted).

  Returns int32 [n] with a static n.
  """
  if not 0 <= min_pos < seq_len:
    raise ValueError(f"query_min_pos={min_pos} must be in [0, seq_len={seq_len})")
  span = seq_len - min_pos
  if fraction >= 1.0:
    return jnp.arange(min_pos, seq_len, dtype=jnp.int32)
  n = max(1, int(round(fraction * span)))
  pick = jax.random.permutation(rng, span)[:n]
  return (jnp.sort(pick) + min_pos).astype(jnp.int32)


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
  """Block top-p (the DESIGN.md contract) of the indexer and of the teacher per query."""
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


# ---------------------------------------------------------------------------
# Forward pass of the student (optionally rematerialised per layer).


def hidden_states(model, input_ids, *, valid=None, sparse_queries=None, remat: bool = True):
  """Final-norm hidden states [batch, seq, embed] of a full sequence (no cache).

  With `remat`, each decoder layer runs under `nnx.remat`: the backward pass keeps one
  [batch, seq, embed] activation per layer instead of every intermediate.
  """
  if not remat:
    h, _ = model.hidden_states(input_ids, valid=valid, sparse_queries=sparse_queries)
    return h
  b, s = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  inv_freq = model.inv_freq()
  x = jnp.take(model.embed[...], input_ids, axis=0)

  def run(layer, x, positions, inv_freq, valid, sparse_queries):
    y, _ = layer(x, positions, inv_freq, valid=valid, sparse_queries=sparse_queries)
    return y

  step = nnx.remat(run)
  for layer in model.layers:
    x = step(layer, x, positions, inv_freq, valid, sparse_queries)
  return model.final_norm(x)


def output_rows(model) -> tuple[jax.Array, bool]:
  """The output projection and its layout: (embed [vocab, e], True) when tied, else
  (lm_head [e, vocab], False)."""
  if model.cfg.tie_embeddings:
    return model.embed[...], True
  return model.lm_head[...], False


def _chunks(x, chunk):
  """[b, s, ...] -> [n, b, chunk, ...] (zero padded)."""
  b, s = x.shape[:2]
  n = -(-s // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - s)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)


# ---------------------------------------------------------------------------
# Stage 2: top-k self-distillation.


def topk_kl(h, out_w, tied: bool, t_ids, t_logits, mask, *, chunk: int = 512):
  """Sum over masked positions of KL(softmax(teacher top-k) || softmax(student on those ids)).

  h: [batch, seq, embed] student hidden states; out_w as from `output_rows`;
  t_ids: int32 [batch, seq, k]; t_logits: float32 [batch, seq, k]; mask: bool [batch, seq].
  Only the k student logits are formed ([batch, chunk, k] per chunk). Returns (kl_sum, count).
  """
  b, s, e = h.shape
  chunk = min(chunk, s)

  def body(acc, xs):
    hc, ic, lc, mc = xs
    w = jnp.take(out_w, ic, axis=0 if tied else 1)  # [b, c, k, e] or [e, b, c, k]
    eq = "bce,bcke->bck" if tied else "bce,ebck->bck"
    z = jnp.einsum(eq, hc, w, preferred_element_type=jnp.float32)
    lt = jax.nn.log_softmax(lc.astype(jnp.float32), axis=-1)
    ls = jax.nn.log_softmax(z, axis=-1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    return acc + jnp.sum(jnp.where(mc, kl, 0.0)), None

  xs = (_chunks(h, chunk), _chunks(t_ids, chunk), _chunks(t_logits, chunk), _chunks(mask, chunk))
  total, _ = jax.lax.scan(jax.checkpoint(body), jnp.zeros((), jnp.float32), xs)
  return total, jnp.sum(mask).astype(jnp.float32)


def teacher_topk(model, input_ids, *, valid=None, k: int = 10, chunk: int = 512):
  """The dense teacher's top-k logits per position: (ids int32 [b, s, k], logits f32 [b, s, k]).

  Logits are formed one position chunk at a time ([batch, chunk, vocab]).
  """
  h, _ = model.hidden_states(input_ids, valid=valid)
  out_w, tied = output_rows(model)
  chunk = min(chunk, h.shape[1])

  def one(hc):
    eq = "bce,ve->bcv" if tied else "bce,ev->bcv"
    z = jnp.einsum(eq, hc, out_w, preferred_element_type=jnp.float32)
    vals, ids = jax.lax.top_k(z, k)
    return ids.astype(jnp.int32), vals

  ids, vals = jax.lax.map(one, _chunks(h, chunk))
  s = input_ids.shape[1]
  merge = lambda x: jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1, k))[:, :s]
  return merge(ids), merge(vals)


# ---------------------------------------------------------------------------
# Plain LM fine-tuning.


def lm_loss(h, out_w, tied: bool, input_ids, valid, *, chunk: int = 512):
  """Next-token cross-entropy summed over positions whose target is real.

  h: [b, s, e]; input_ids: int32 [b, s]; valid: bool [b, s] or None. Logits are formed
  per position chunk. Returns (nll_sum, count).
  """
  b, s, e = h.shape
  if valid is None:
    valid = jnp.ones((b, s), bool)
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros((b, 1), input_ids.dtype)], axis=1)
  mask = jnp.concatenate([valid[:, 1:], jnp.zeros((b, 1), bool)], axis=1) & valid
  chunk = min(chunk, s)

  def body(acc, xs):
    hc, tc, mc = xs
    eq = "bce,ve->bcv" if tied else "bce,ev->bcv"
    z = jnp.einsum(eq, hc, out_w, preferred_element_type=jnp.float32)
    nll = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0]
    return acc + jnp.sum(jnp.where(mc, nll, 0.0)), None

  xs = (_chunks(h, chunk), _chunks(targets, chunk), _chunks(mask, chunk))
  total, _ = jax.lax.scan(jax.checkpoint(body), jnp.zeros((), jnp.float32), xs)
  return total, jnp.sum(mask).astype(jnp.float32)
