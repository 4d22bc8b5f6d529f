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
import numpy as np
from flax import nnx

from pallas_kernels import reference as ref
from rtpurbo_jax.attention import indexer as indexer_lib

NEG_INF = -jnp.inf

# ---------------------------------------------------------------------------
# Stage 1: the teacher pass (frozen backbone, no gradient) and the indexer KL.


@dataclasses.dataclass(frozen=True)
class TeacherActs:
  """What stage 1 needs from the frozen model: every retrieval head of every layer, stacked
  on one head axis so that the loss handles all of them in one pass.

  heads: static ((layer, query head), ...) of the stacked axis, in layer order.
  q_pre, q: [batch, seq, n_ret, head_dim] the head's query before / after RoPE.
  k_pre, k: [batch, seq, n_ret, head_dim] the key of the head's KV head, before / after RoPE.
  """

  heads: tuple[tuple[int, int], ...]
  q_pre: jax.Array
  k_pre: jax.Array
  q: jax.Array
  k: jax.Array

  def layer_counts(self) -> list[tuple[int, int]]:
    """[(layer, number of its retrieval heads)] in stacking order."""
    counts: dict[int, int] = {}
    for layer, _ in self.heads:
      counts[layer] = counts.get(layer, 0) + 1
    return list(counts.items())


jax.tree_util.register_dataclass(TeacherActs, data_fields=["q_pre", "k_pre", "q", "k"],
                                 meta_fields=["heads"])


def teacher_acts(model, input_ids) -> TeacherActs:
  """Run the frozen (dense) model and collect the retrieval heads' pre/post-RoPE q and k.

  input_ids: [batch, seq] int32 (contiguous positions 0..seq-1). Layers after the last one
  with retrieval heads are not run. Every output is wrapped in `stop_gradient`.
  """
  b, s = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  inv_freq = model.inv_freq()
  ret_layers = [i for i, l in enumerate(model.layers) if l.attn.heads.retrieval]
  if not ret_layers:
    raise ValueError("the head plan has no retrieval heads: stage 1 has nothing to train")
  heads, parts = [], []
  x = jnp.take(model.embed[...], input_ids, axis=0)
  for i, layer in enumerate(model.layers[:ret_layers[-1] + 1]):
    lh = layer.attn.heads
    if lh.retrieval:
      q_pre, k_pre, q, k, _ = layer.attn.project_qkv(layer.input_norm(x), positions, inv_freq)
      ret = jnp.asarray(lh.retrieval)
      kv = jnp.asarray([lh.kv_of(h) for h in lh.retrieval])
      parts.append((q_pre[:, :, ret], k_pre[:, :, kv], q[:, :, ret], k[:, :, kv]))
      heads += [(i, h) for h in lh.retrieval]
    if i < ret_layers[-1]:
      x, _ = layer(x, positions, inv_freq)
  stacked = [jax.lax.stop_gradient(jnp.concatenate(p, axis=2)) for p in zip(*parts)]
  return TeacherActs(tuple(heads), *stacked)


def stacked_indexer(model, acts: TeacherActs) -> tuple[jax.Array, jax.Array]:
  """The indexer weights (W_q, W_k), each [n_ret, r, head_dim], in `acts`' head order."""
  layers = [layer for layer, _ in acts.layer_counts()]
  wq = jnp.concatenate([model.layers[i].attn.indexer_wq[...] for i in layers], axis=0)
  wk = jnp.concatenate([model.layers[i].attn.indexer_wk[...] for i in layers], axis=0)
  return wq, wk


def stacked_distance_bias(model, acts: TeacherActs):
  """The indexer's distance bias [n_ret, distance_buckets] in `acts`' head order, or None
  (the model has none)."""
  layers = [layer for layer, _ in acts.layer_counts()]
  biases = [model.layers[i].attn.distance_bias for i in layers]
  if any(b is None for b in biases):
    return None
  return jnp.concatenate(biases, axis=0)


def query_positions(seq_len: int, fraction: float, min_pos: int, rng):
  """Query positions for stage 1: all of [min_pos, seq_len) when fraction >= 1, else a
  seeded uniform subset of round(fraction * (seq_len - min_pos)) of them (sorted).

  Returns int32 [n] with a static n: a numpy array when every position is taken (its values
  are then static, which lets the loss skip keys past each chunk's last query), else a jax
  array.
  """
  if not 0 <= min_pos < seq_len:
    raise ValueError(f"query_min_pos={min_pos} must be in [0, seq_len={seq_len})")
  span = seq_len - min_pos
  if fraction >= 1.0:
    return np.arange(min_pos, seq_len, dtype=np.int32)
  n = max(1, int(round(fraction * span)))
  pick = jax.random.permutation(rng, span)[:n]
  return (jnp.sort(pick) + min_pos).astype(jnp.int32)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _chunk_key_lengths(queries, n_chunks: int, chunk: int, s_pad: int, bs: int) -> list[int]:
  """Static number of keys each query chunk needs: up to its last query (rounded to whole
  blocks) when the positions are concrete, else the whole padded sequence."""
  if not isinstance(queries, np.ndarray):
    return [s_pad] * n_chunks
  q = np.pad(queries, (0, n_chunks * chunk - len(queries)), constant_values=-1)
  return [min(s_pad, _round_up(max(int(c.max()), 0) + 1, bs)) for c in q.reshape(n_chunks, -1)]


STAGE1_SUMS = ("kl", "count", "recall", "fraction", "oracle_fraction", "stats_count")
STAGE1_OBJECTIVES = ("token", "block")


def stage1_sums(wq, wk, acts: TeacherActs, queries, *, chunk: int, top_p: float,
                block_size: int, stats_stride: int = 1, objective: str = "token",
                distance_bias=None) -> dict:
  """Per-head sums over queries of KL(teacher attention || softmax(indexer scores)).

  objective "token": the KL over keys (the method's stage-1 loss). "block": the KL between
  the two distributions summed within each key block, KL(A || P) with A_b / P_b the teacher's
  / indexer's mass in block b: what block top-p reads, so the indexer is free to spread
  mass inside a block and is fitted only where selection depends on it.

  wq, wk: [n_ret, r, head_dim] (the differentiable inputs), in `acts`' head order.
  distance_bias: optional [n_ret, n_buckets] (differentiable), beyond the method: added to the
  indexer score of every key by `indexer.distance_bucket` of its block's distance behind the
  query's block, a learned recency prior that the position-free 16-d score cannot express.
  Constant within a key block, so block top-p reads it as a per-block offset.
  queries: int32 [n] query positions (-1 = padding, ignored); a numpy array of concrete
  positions lets each query chunk read only the keys up to its last query.
  The teacher's attention row of each query is formed whole ([batch, n_ret, chunk, keys]
  per chunk, fp32), so its log-sum-exp needs no separate pass; memory is O(keys x chunk),
  and each chunk runs under `jax.checkpoint`.
  Selection statistics (block top-p of the indexer and of the teacher) are metrics only:
  they are taken on every `stats_stride`-th query row of each chunk.
  Returns a dict of [batch, n_ret] float32 sums: kl and count over the queries; recall
  (teacher mass inside the indexer's top-p blocks), fraction (selected causal blocks),
  oracle_fraction (blocks the teacher's own top-p needs) and stats_count over the
  statistics rows.
  """
  if objective not in STAGE1_OBJECTIVES:
    raise ValueError(f"objective={objective!r}: one of {STAGE1_OBJECTIVES}")
  b, s, h, d = acts.q.shape
  bs = block_size
  s_pad = _round_up(s, bs)
  pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
  ki = jnp.pad(indexer_lib.project(wk, acts.k_pre), pad)  # [b, s_pad, h, r]: grads reach W_k
  kf = jnp.pad(acts.k.astype(jnp.float32), pad)
  n = queries.shape[0]
  chunk = min(chunk, n)
  n_chunks = -(-n // chunk)
  lengths = _chunk_key_lengths(queries, n_chunks, chunk, s_pad, bs)
  qidx = jnp.pad(jnp.asarray(queries, jnp.int32), (0, n_chunks * chunk - n),
                 constant_values=-1).reshape(n_chunks, chunk)

  def body(wq, bias, ki, kf, qc, length):
    safe = jnp.maximum(qc, 0)
    q = jnp.take(acts.q, safe, axis=1).astype(jnp.float32)  # [b, c, h, d]
    qi = indexer_lib.project(wq, jnp.take(acts.q_pre, safe, axis=1))  # [b, c, h, r]
    z = jnp.einsum("bqhd,bkhd->bhqk", q, kf[:, :length]) / math.sqrt(d)  # [b, h, c, L]
    sc = indexer_lib.scores(qi, ki[:, :length])  # indexer logits [b, h, c, L]
    if bias is not None:
      bucket = indexer_lib.distance_bucket(safe[:, None] // bs, jnp.arange(length)[None] // bs,
                                           bias.shape[-1])  # [c, L]
      sc = sc + jnp.take(bias.astype(jnp.float32), bucket, axis=1)[None]
    # Padding queries (-1) act as query 0 so that no row is empty (an empty row would give
    # -inf log-sum-exp and NaN gradients); their terms are zeroed below.
    vis = jnp.arange(length)[None, :] <= safe[:, None]  # [c, L]; also hides padded keys
    zm = jnp.where(vis, z, NEG_INF)
    lse_t = jax.nn.logsumexp(zm, axis=-1, keepdims=True)
    a = jnp.exp(zm - lse_t)  # teacher attention, 0 where invisible
    lse_s = jax.nn.logsumexp(jnp.where(vis, sc, NEG_INF), axis=-1)  # [b, h, c]
    if objective == "token":
      # KL = sum_j a_j (log a_j - log p_j) with log a_j = z_j - lse_t, log p_j = s_j - lse_s.
      kl = jnp.sum(jnp.where(vis, a * ((z - lse_t) - sc), 0.0), axis=-1) + lse_s
    else:
      kl = _block_kl(a, jnp.where(vis, sc, _FINITE_NEG), lse_s, bs)
    real = qc >= 0
    out = {"kl": jnp.sum(jnp.where(real, kl, 0.0), axis=-1),
           "count": jnp.broadcast_to(jnp.sum(real), (b, h)).astype(jnp.float32)}
    rows = slice(None, None, stats_stride)
    stats = _selection_stats(jax.lax.stop_gradient(sc[:, :, rows]),
                             jax.lax.stop_gradient(zm[:, :, rows]),
                             jax.lax.stop_gradient(a[:, :, rows]), vis[rows], qc[rows],
                             top_p, bs)
    sreal = real[rows]
    out.update({k: jnp.sum(jnp.where(sreal, v, 0.0), axis=-1) for k, v in stats.items()})
    out["stats_count"] = jnp.broadcast_to(jnp.sum(sreal), (b, h)).astype(jnp.float32)
    return out

  step = jax.checkpoint(body, static_argnums=(5,))
  zero = jnp.zeros((b, h), jnp.float32)
  sums = {k: zero for k in STAGE1_SUMS}
  if len(set(lengths)) == 1:  # one shape: a scan keeps the program small
    def scan_body(carry, qc):
      return jax.tree.map(jnp.add, carry,
                          step(wq, distance_bias, ki, kf, qc, lengths[0])), None
    sums, _ = jax.lax.scan(scan_body, sums, qidx)
    return sums
  for i, length in enumerate(lengths):  # causal: chunk i reads keys up to its last query only
    sums = jax.tree.map(jnp.add, sums, step(wq, distance_bias, ki, kf, qidx[i], length))
  return sums


_FINITE_NEG = -1e30  # hidden keys in a block's log-sum-exp: exp() is 0, the gradient finite


def _block_kl(a, sc, lse_s, bs):
  """sum_b A_b (log A_b - log P_b) over blocks with teacher mass. a: teacher attention
  [b, h, c, L] (0 on hidden keys); sc: indexer logits with hidden keys at _FINITE_NEG;
  lse_s: [b, h, c] the indexer's log-normaliser over visible keys. L % bs == 0."""
  nb = a.shape[-1] // bs
  mass = a.reshape(a.shape[:3] + (nb, bs)).sum(-1)  # A_b
  log_p = jax.nn.logsumexp(sc.reshape(sc.shape[:3] + (nb, bs)), axis=-1) - lse_s[..., None]
  log_a = jnp.log(jnp.where(mass > 0, mass, 1.0))
  return jnp.sum(jnp.where(mass > 0, mass * (log_a - log_p), 0.0), axis=-1)


def _selection_stats(sc, zm, a, vis, qc, top_p, bs):
  """Block top-p (the docs/DESIGN.md §1 contract) of the indexer and of the teacher per query.

  sc, zm, a: [b, h, c, L] indexer logits, masked teacher logits, teacher attention;
  vis: [c, L]; L % bs == 0. Returns [b, h, c] recall, fraction and oracle_fraction.
  """
  length = sc.shape[-1]
  nb = length // bs
  vis_b = jnp.broadcast_to(vis, sc.shape)
  own = jnp.broadcast_to(jnp.maximum(qc, 0) // bs, sc.shape[:3])
  lm_i, ok = ref.block_logmass(sc, vis_b, bs)
  lm_t, _ = ref.block_logmass(zm, vis_b, bs)
  sel_i = ref.topp_from_block_logmass(lm_i, ok, own, top_p)
  sel_t = ref.topp_from_block_logmass(lm_t, ok, own, top_p)
  t_mass = a.reshape(a.shape[:3] + (nb, bs)).sum(-1)
  n_ok = jnp.maximum(jnp.sum(ok, axis=-1), 1)
  return {"recall": jnp.sum(jnp.where(sel_i, t_mass, 0.0), axis=-1),
          "fraction": jnp.sum(sel_i, axis=-1) / n_ok,
          "oracle_fraction": jnp.sum(sel_t, axis=-1) / n_ok}


def per_head_means(sums: dict) -> dict:
  """{kl, recall, fraction, oracle_fraction}: [batch, n_ret] means from `stage1_sums`."""
  out = {"kl": sums["kl"] / jnp.maximum(sums["count"], 1.0)}
  for k in ("recall", "fraction", "oracle_fraction"):
    out[k] = sums[k] / jnp.maximum(sums["stats_count"], 1.0)
  return out


def stage1_loss(wq, wk, acts: TeacherActs, queries, *, chunk: int, top_p: float,
                block_size: int, stats_stride: int = 1, objective: str = "token",
                distance_bias=None):
  """Stage-1 objective over all retrieval heads (stacked as in `acts`).

  Per sequence the loss is the sum over retrieval heads of the head's KL averaged over the
  query positions (heads train independently). Returns (loss_sum over the batch, weight =
  batch size, metric sums: per-sequence means over heads of kl, recall, fraction,
  oracle_fraction, summed over the batch).
  """
  sums = stage1_sums(wq, wk, acts, queries, chunk=chunk, top_p=top_p, block_size=block_size,
                     stats_stride=stats_stride, objective=objective,
                     distance_bias=distance_bias)
  means = per_head_means(sums)
  n_heads = acts.q.shape[2]
  loss = jnp.sum(means["kl"])
  metrics = {k: jnp.sum(v) / n_heads for k, v in means.items()}
  return loss, jnp.asarray(acts.q.shape[0], jnp.float32), metrics


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
