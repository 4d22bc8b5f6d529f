"""Training losses against brute-force oracles (materialised attention / full logits, numpy)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax.attention.indexer import IndexerParam
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.models.transformer import Transformer
from rtpurbo_jax.train import losses

# ---------------------------------------------------------------------------
# numpy oracles


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_topp_blocks(mass_tokens, t, bs, p):
  """Brute-force block top-p for one query at position t over token probabilities."""
  nb = t // bs + 1
  blocks = np.array([mass_tokens[b * bs:min((b + 1) * bs, t + 1)].sum() for b in range(nb)])
  order = sorted(range(nb), key=lambda b: (-blocks[b], b))
  sel, cum = set(), 0.0
  for b in order:
    if cum >= p:
      break
    sel.add(b)
    cum += blocks[b]
  sel.add(t // bs)
  return sel, nb


def np_bucket(d_blocks, n_buckets):
  """0 for the own block, 1 + floor(log2(d)) for d >= 1 blocks back, clipped."""
  return 0 if d_blocks == 0 else min(1 + int(math.floor(math.log2(d_blocks))), n_buckets - 1)


def np_stage1(q_pre, k_pre, q, k, wq, wk, queries, bs, top_p, bias=None):
  """Per (batch, head) mean over queries of KL, recall, fraction, oracle fraction.
  bias: optional [h, n_buckets] added to each key's indexer score by its block distance."""
  b, s, h, d = q.shape
  out = {key: np.zeros((b, h)) for key in ("kl", "recall", "fraction", "oracle_fraction")}
  for bi in range(b):
    for hi in range(h):
      qi = q_pre[bi, :, hi] @ wq[hi].T
      ki = k_pre[bi, :, hi] @ wk[hi].T
      for t in queries:
        a = np_softmax(q[bi, t, hi] @ k[bi, :t + 1, hi].T / math.sqrt(d))
        sc = qi[t] @ ki[:t + 1].T
        if bias is not None:
          sc = sc + np.array([bias[hi, np_bucket(t // bs - j // bs, bias.shape[1])]
                              for j in range(t + 1)])
        p = np_softmax(sc)
        out["kl"][bi, hi] += np.sum(a * (np.log(a) - np.log(p)))
        sel, nb = np_topp_blocks(p, t, bs, top_p)
        sel_t, _ = np_topp_blocks(a, t, bs, top_p)
        out["recall"][bi, hi] += sum(a[j] for j in range(t + 1) if j // bs in sel)
        out["fraction"][bi, hi] += len(sel) / nb
        out["oracle_fraction"][bi, hi] += len(sel_t) / nb
  return {key: v / len(queries) for key, v in out.items()}


def tiny_model(seed, *, tie=True, plan_mask=((0, 1, 0, 0), (1, 0, 0, 1)), layers=2,
               init_std=0.2):
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=layers,
                    num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=tie)
  plan = HeadPlan.from_mask(plan_mask, 2)
  sp = SparseConfig(mode="dense", indexer_dim=8, block_size=8, seqlen_threshold=0, window=16)
  return Transformer(cfg, sparse=sp, plan=plan, rngs=nnx.Rngs(seed), init_std=init_std)


# ---------------------------------------------------------------------------
# Stage 1


@pytest.mark.parametrize("fraction,chunk,stride", [(1.0, 16, 1), (0.4, 7, 1), (1.0, 13, 3)])
def test_stage1_loss_matches_bruteforce(seed, rng, fraction, chunk, stride):
  b, s, h, d, r, bs = 2, 45, 2, 16, 4, 8  # s not a multiple of the block size
  q_pre, k_pre, q, k = (jnp.asarray(rng.normal(size=(b, s, h, d)) * 1.5, jnp.float32)
                        for _ in range(4))
  wq = jnp.asarray(rng.normal(size=(h, r, d)) * 0.5, jnp.float32)
  wk = jnp.asarray(rng.normal(size=(h, r, d)) * 0.5, jnp.float32)
  queries = losses.query_positions(s, fraction, 3, jax.random.key(seed))
  # Concrete positions (fraction 1) take the causal per-chunk key bound; sampled ones do not.
  assert isinstance(queries, np.ndarray) == (fraction == 1.0)
  acts = losses.TeacherActs(((0, 0), (0, 1)), q_pre, k_pre, q, k)
  got = jax.jit(lambda wq, wk, acts: losses.stage1_sums(
      wq, wk, acts, queries, chunk=chunk, top_p=0.7, block_size=bs,
      stats_stride=stride))(wq, wk, acts)
  n = len(queries)
  assert n == (s - 3 if fraction == 1.0 else round(0.4 * (s - 3)))
  np.testing.assert_allclose(np.asarray(got["count"]), n)
  want = np_stage1(*(np.asarray(x, np.float64) for x in (q_pre, k_pre, q, k, wq, wk)),
                   np.asarray(queries), bs, 0.7)
  np.testing.assert_allclose(np.asarray(got["kl"]) / n, want["kl"], rtol=2e-4, atol=2e-5)
  # Selection statistics come from every `stride`-th row of each query chunk.
  qs = np.asarray(queries)
  n_chunks = -(-n // chunk)
  stats_rows = np.concatenate([qs[i * chunk:(i + 1) * chunk][::stride] for i in range(n_chunks)])
  np.testing.assert_allclose(np.asarray(got["stats_count"]), len(stats_rows))
  want_stats = np_stage1(*(np.asarray(x, np.float64) for x in (q_pre, k_pre, q, k, wq, wk)),
                         stats_rows, bs, 0.7)
  for key in ("recall", "fraction", "oracle_fraction"):
    np.testing.assert_allclose(np.asarray(got[key]) / len(stats_rows), want_stats[key],
                               rtol=2e-4, atol=2e-5, err_msg=key)
  # The whole objective: sum over heads of per-head means, summed over the batch.
  loss, weight, metrics = losses.stage1_loss(wq, wk, acts, queries, chunk=chunk, top_p=0.7,
                                             block_size=bs, stats_stride=stride)
  np.testing.assert_allclose(float(loss), want["kl"].sum(), rtol=2e-4)
  assert float(weight) == b
  np.testing.assert_allclose(float(metrics["kl"]) / b, want["kl"].mean(), rtol=2e-4)
  np.testing.assert_allclose(float(metrics["recall"]) / b, want_stats["recall"].mean(),
                             rtol=2e-4)


def test_stage1_gradient_matches_bruteforce(rng):
  b, s, h, d, r = 1, 20, 1, 8, 4
  q_pre, k_pre, q, k = (jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
                        for _ in range(4))
  wq = jnp.asarray(rng.normal(size=(h, r, d)) * 0.5, jnp.float32)
  wk = jnp.asarray(rng.normal(size=(h, r, d)) * 0.5, jnp.float32)
  acts = losses.TeacherActs(((0, 0),), q_pre, k_pre, q, k)

  def chunked(wq, wk, queries):
    return losses.stage1_sums(wq, wk, acts, queries, chunk=6, top_p=0.9, block_size=4)["kl"].sum()

  def dense(wq, wk):  # materialised [s, s] reference in jnp
    a = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((s, s), bool)),
                                 q[0, :, 0] @ k[0, :, 0].T / math.sqrt(d), -jnp.inf))
    sc = (q_pre[0, :, 0] @ wq[0].T) @ (k_pre[0, :, 0] @ wk[0].T).T
    logp = jax.nn.log_softmax(jnp.where(jnp.tril(jnp.ones((s, s), bool)), sc, -jnp.inf))
    return jnp.sum(jnp.where(a > 0, a * (jnp.log(jnp.where(a > 0, a, 1)) - logp), 0.0))

  g2 = jax.grad(dense, argnums=(0, 1))(wq, wk)
  # Concrete positions (per-chunk causal key bounds, unrolled) and traced ones (one scan).
  for queries in (np.arange(s, dtype=np.int32), jnp.arange(s, dtype=jnp.int32)):
    np.testing.assert_allclose(chunked(wq, wk, queries), dense(wq, wk), rtol=1e-5)
    g1 = jax.jit(jax.grad(lambda a, b: chunked(a, b, queries), argnums=(0, 1)))(wq, wk)
    for a, b_ in zip(g1, g2):
      np.testing.assert_allclose(a, b_, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("n_buckets", [3, 16])
def test_stage1_distance_bias_matches_bruteforce(rng, n_buckets):
  b, s, h, d, r, bs = 1, 45, 2, 16, 4, 4  # up to 11 blocks back: buckets 0..4 before clipping
  q_pre, k_pre, q, k = (jnp.asarray(rng.normal(size=(b, s, h, d)) * 1.5, jnp.float32)
                        for _ in range(4))
  wq = jnp.asarray(rng.normal(size=(h, r, d)) * 0.5, jnp.float32)
  wk = jnp.asarray(rng.normal(size=(h, r, d)) * 0.5, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(h, n_buckets)) * 2.0, jnp.float32)
  acts = losses.TeacherActs(((0, 0), (0, 1)), q_pre, k_pre, q, k)
  queries = np.arange(1, s, dtype=np.int32)
  args = [np.asarray(x, np.float64) for x in (q_pre, k_pre, q, k, wq, wk)]
  want = np_stage1(*args, queries, bs, 0.7, bias=np.asarray(bias, np.float64))
  plain = np_stage1(*args, queries, bs, 0.7)
  assert np.abs(want["kl"] - plain["kl"]).max() > 1e-3  # the bias changes the loss
  for qs in (queries, jnp.asarray(queries)):  # per-chunk key bounds, and one scan
    got = losses.per_head_means(losses.stage1_sums(
        wq, wk, acts, qs, chunk=10, top_p=0.7, block_size=bs, distance_bias=bias))
    for key in ("kl", "recall", "fraction", "oracle_fraction"):
      np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=2e-4, atol=2e-5,
                                 err_msg=key)
  # Zero bias is the plain score; the bias gets the gradient of a materialised form.
  zero = losses.stage1_sums(wq, wk, acts, queries, chunk=10, top_p=0.7, block_size=bs,
                            distance_bias=jnp.zeros_like(bias))
  np.testing.assert_allclose(np.asarray(zero["kl"]) / len(queries), plain["kl"], rtol=2e-4)
  buckets = np.array([[np_bucket(max(t // bs - j // bs, 0), n_buckets) for j in range(s)]
                      for t in range(s)])
  causal = jnp.tril(jnp.ones((s, s), bool))

  def dense(bias):
    tot = 0.0
    for hi in range(h):
      a = jax.nn.softmax(jnp.where(causal, q[0, :, hi] @ k[0, :, hi].T / math.sqrt(d), -jnp.inf))
      sc = (q_pre[0, :, hi] @ wq[hi].T) @ (k_pre[0, :, hi] @ wk[hi].T).T + bias[hi][buckets]
      logp = jax.nn.log_softmax(jnp.where(causal, sc, -jnp.inf))
      tot += jnp.sum(jnp.where(causal, a * (jnp.log(jnp.where(causal, a, 1.0)) - logp),
                               0.0)[queries])
    return tot

  def chunked(bias):
    return losses.stage1_sums(wq, wk, acts, queries, chunk=10, top_p=0.7, block_size=bs,
                              distance_bias=bias)["kl"].sum()

  g1, g2 = jax.jit(jax.grad(chunked))(bias), jax.grad(dense)(bias)
  assert np.abs(np.asarray(g2)).max() > 1e-3
  np.testing.assert_allclose(g1, g2, rtol=5e-4, atol=1e-5)


def np_block_kl(q_pre, k_pre, q, k, wq, wk, queries, bs):
  """Per (batch, head) mean over queries of KL between per-block masses (numpy, float64)."""
  b, s, h, d = q.shape
  out = np.zeros((b, h))
  for bi in range(b):
    for hi in range(h):
      qi, ki = q_pre[bi, :, hi] @ wq[hi].T, k_pre[bi, :, hi] @ wk[hi].T
      for t in queries:
        a = np_softmax(q[bi, t, hi] @ k[bi, :t + 1, hi].T / math.sqrt(d))
        p = np_softmax(qi[t] @ ki[:t + 1].T)
        nb = t // bs + 1
        am = np.array([a[j * bs:(j + 1) * bs].sum() for j in range(nb)])
        pm = np.array([p[j * bs:(j + 1) * bs].sum() for j in range(nb)])
        out[bi, hi] += np.sum(am * (np.log(am) - np.log(pm)))
  return out / len(queries)


@pytest.mark.parametrize("chunk", [16, 7])
def test_stage1_block_objective_matches_bruteforce(rng, chunk):
  b, s, h, d, r, bs = 2, 45, 2, 16, 4, 8
  q_pre, k_pre, q, k = (jnp.asarray(rng.normal(size=(b, s, h, d)) * 1.5, jnp.float32)
                        for _ in range(4))
  wq = jnp.asarray(rng.normal(size=(h, r, d)) * 0.5, jnp.float32)
  wk = jnp.asarray(rng.normal(size=(h, r, d)) * 0.5, jnp.float32)
  acts = losses.TeacherActs(((0, 0), (0, 1)), q_pre, k_pre, q, k)
  queries = np.arange(2, s, dtype=np.int32)
  args = [np.asarray(x, np.float64) for x in (q_pre, k_pre, q, k, wq, wk)]
  want = np_block_kl(*args, queries, bs)
  token = np_stage1(*args, queries, bs, 0.7)["kl"]
  for qs in (queries, jnp.asarray(queries)):  # per-chunk key bounds, and one scan
    got = losses.stage1_sums(wq, wk, acts, qs, chunk=chunk, top_p=0.7, block_size=bs,
                             objective="block")
    np.testing.assert_allclose(np.asarray(got["kl"]) / len(queries), want, rtol=2e-4,
                               atol=2e-6)
  # Summing within blocks can only lose information: block KL <= token KL (data processing).
  assert np.all(want <= token + 1e-9) and np.any(want < token - 1e-3)
  # The gradient is that of a materialised jnp form (finite, through the in-block sums).
  n = len(queries)

  def dense(wq, wk):
    tot = 0.0
    for hi in range(h):
      for bi in range(b):
        causal = jnp.tril(jnp.ones((s, s), bool))
        a = jax.nn.softmax(jnp.where(causal, q[bi, :, hi] @ k[bi, :, hi].T / math.sqrt(d),
                                     -jnp.inf))
        sc = (q_pre[bi, :, hi] @ wq[hi].T) @ (k_pre[bi, :, hi] @ wk[hi].T).T
        # log P_b in log space: an fp32 softmax underflows to 0 on blocks the teacher uses.
        logp = jnp.where(causal, jax.nn.log_softmax(jnp.where(causal, sc, -jnp.inf)), -1e30)
        nb = -(-s // bs)
        am = jnp.pad(a, ((0, 0), (0, nb * bs - s))).reshape(s, nb, bs).sum(-1)[queries]
        lpm = jax.nn.logsumexp(jnp.pad(logp, ((0, 0), (0, nb * bs - s)), constant_values=-1e30)
                               .reshape(s, nb, bs), axis=-1)[queries]
        tot += jnp.sum(jnp.where(am > 0, am * (jnp.log(jnp.where(am > 0, am, 1.0)) - lpm), 0.0))
    return tot / n

  def chunked(wq, wk):
    return losses.stage1_sums(wq, wk, acts, queries, chunk=chunk, top_p=0.7, block_size=bs,
                              objective="block")["kl"].sum() / n

  np.testing.assert_allclose(float(chunked(wq, wk)), float(dense(wq, wk)), rtol=1e-5)
  g1 = jax.jit(jax.grad(chunked, argnums=(0, 1)))(wq, wk)
  g2 = jax.grad(dense, argnums=(0, 1))(wq, wk)
  for x, y in zip(g1, g2):
    assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_allclose(x, y, rtol=5e-4, atol=1e-5)
  with pytest.raises(ValueError, match="objective"):
    losses.stage1_sums(wq, wk, acts, queries, chunk=chunk, top_p=0.7, block_size=bs,
                       objective="tokens")


def test_teacher_acts_match_model_attention(seed):
  model = tiny_model(seed)
  s = 33
  ids = jax.random.randint(jax.random.key(seed), (2, s), 0, 97)
  acts = nnx.jit(losses.teacher_acts)(model, ids)
  # plan: layer 0 head 1, layer 1 heads 0 and 3, stacked in layer order.
  assert acts.heads == ((0, 1), (1, 0), (1, 3))
  assert acts.layer_counts() == [(0, 1), (1, 2)]

  @nnx.jit
  def layer1_inputs(model, ids):  # run layer 0 of the dense model by hand
    pos = jnp.broadcast_to(jnp.arange(s), (2, s))
    x = jnp.take(model.embed[...], ids, axis=0)
    x1, _ = model.layers[0](x, pos, model.inv_freq())
    return model.layers[1].attn.project_qkv(model.layers[1].input_norm(x1), pos,
                                            model.inv_freq())

  q_pre, k_pre, q, k, _ = layer1_inputs(model, ids)
  # retrieval heads (0, 3) of layer 1 -> kv heads (0, 1)
  np.testing.assert_allclose(acts.q_pre[:, :, 1:], q_pre[:, :, [0, 3]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acts.k[:, :, 1:], k[:, :, [0, 1]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acts.q[:, :, 1:], q[:, :, [0, 3]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acts.k_pre[:, :, 1:], k_pre[:, :, [0, 1]], rtol=1e-5, atol=1e-6)
  wq, wk = losses.stacked_indexer(model, acts)
  np.testing.assert_array_equal(wq[1:], model.layers[1].attn.indexer_wq[...])
  np.testing.assert_array_equal(wk[:1], model.layers[0].attn.indexer_wk[...])


def test_stage1_gradients_reach_only_the_indexer(seed):
  from rtpurbo_jax.config import run_config
  from rtpurbo_jax.train import stages
  from rtpurbo_jax.train.trainer import ParamSplit
  model = tiny_model(seed)
  o = run_config().train.stage1
  o.query_chunk = 8
  task = stages.stage1_task(ParamSplit(model, IndexerParam), o, model.sparse)
  # Differentiate the task's loss w.r.t. EVERY parameter: the backbone must get exact zeros.
  graphdef, params = nnx.split(model, nnx.Param)
  ids = jax.random.randint(jax.random.key(seed), (1, 24), 0, 97)

  def f(params):
    m = nnx.merge(graphdef, params)
    aux = task.prepare(m, {"ids": ids}, jax.random.key(0))
    return task.loss(m, {"ids": ids}, aux, jax.random.key(0))[0]

  grads = jax.jit(jax.grad(f))(params)
  flat = {"/".join(map(str, p)): (v, v.get_value()) for p, v in nnx.to_flat_state(grads)}
  idx = {k: g for k, (v, g) in flat.items() if isinstance(v, IndexerParam)}
  rest = {k: g for k, (v, g) in flat.items() if not isinstance(v, IndexerParam)}
  assert len(idx) == 4 and len(rest) > 10
  assert all(float(jnp.abs(g).max()) > 0 for g in idx.values())
  assert all(float(jnp.abs(g).max()) == 0 for g in rest.values())


def test_stage1_32k_step_memory_is_chunked(seed):
  """A 32K-token stage-1 step of a tiny model: compiled temp memory is O(seq x chunk)."""
  from rtpurbo_jax.config import run_config
  from rtpurbo_jax.train import stages
  from rtpurbo_jax.train.trainer import ParamSplit, RunOptions, Trainer
  from rtpurbo_jax import sharding as shd
  s, chunk = 32768, 64
  model = tiny_model(seed, layers=1, plan_mask=((0, 1, 0, 0),))
  o = run_config().train.stage1
  o.update(steps=1, seq_len=s, query_chunk=chunk, query_fraction=1 / 128, warmup=0)
  task = stages.stage1_task(ParamSplit(model, IndexerParam), o, model.sparse)
  mesh = shd.make_mesh({}, devices=jax.devices()[:1])
  tr = Trainer(task, model, o, RunOptions(ckpt_dir="unused", workdir="unused"), mesh)
  batch = {"ids": np.asarray(jax.random.randint(jax.random.key(seed), (1, s), 0, 97))}
  dev = tr.to_device(batch)
  fn = tr._build({k: v.sharding for k, v in dev.items()})
  args = (tr.trainable, tr.opt_state, tr.frozen, dev, jnp.int32(0))
  mem = fn.lower(*args).compile().memory_analysis()
  # Each [chunk, seq] float32 array is 8 MiB; a [seq, seq] one would be 4 GiB.
  chunk_bytes = chunk * s * 4
  assert mem.temp_size_in_bytes < 48 * chunk_bytes, mem.temp_size_in_bytes / chunk_bytes
  m = jax.device_get(tr.step(batch, 0))
  assert np.isfinite(m["loss"]) and m["loss"] > 0
  assert 0 < m["recall"] <= 1 + 1e-6 and 0 < m["fraction"] <= 1


# ---------------------------------------------------------------------------
# Stage 2 and LM


@pytest.mark.parametrize("tie", [True, False])
def test_topk_kl_matches_bruteforce(seed, rng, tie):
  model = tiny_model(seed, tie=tie)
  b, s, k = 2, 19, 5
  ids = jax.random.randint(jax.random.key(seed), (b, s), 0, 97)
  h, _ = nnx.jit(lambda m: m.hidden_states(ids))(model)
  full = np.asarray(nnx.jit(lambda m: m(ids))(model), np.float64)  # [b, s, V] student logits
  t_ids = np.stack([[rng.choice(97, k, replace=False) for _ in range(s)] for _ in range(b)])
  t_logits = rng.normal(size=(b, s, k)) * 3
  mask = rng.random((b, s)) < 0.5
  w, tied = losses.output_rows(model)
  got, cnt = losses.topk_kl(h, w, tied, jnp.asarray(t_ids, jnp.int32),
                            jnp.asarray(t_logits, jnp.float32), jnp.asarray(mask), chunk=6)
  zs = np.take_along_axis(full, t_ids, axis=-1)
  pt, ps = np_softmax(t_logits), np_softmax(zs)
  want = np.sum(np.where(mask, np.sum(pt * (np.log(pt) - np.log(ps)), -1), 0.0))
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  assert float(cnt) == mask.sum()


def test_teacher_topk_and_lm_loss_match_full_logits(seed):
  model = tiny_model(seed, tie=False)
  b, s, k = 2, 21, 4
  ids = jax.random.randint(jax.random.key(seed), (b, s), 0, 97)
  full = np.asarray(nnx.jit(lambda m: m(ids))(model), np.float64)
  t_ids, t_logits = nnx.jit(lambda m: losses.teacher_topk(m, ids, k=k, chunk=8))(model)
  want_vals = -np.sort(-full, axis=-1)[..., :k]
  np.testing.assert_allclose(t_logits, want_vals, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(full, np.asarray(t_ids), -1), want_vals,
                             rtol=1e-5, atol=1e-5)
  h, _ = nnx.jit(lambda m: m.hidden_states(ids))(model)
  w, tied = losses.output_rows(model)
  valid = np.ones((b, s), bool)
  valid[1, 15:] = False
  nll, cnt = losses.lm_loss(h, w, tied, ids, jnp.asarray(valid), chunk=8)
  logp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - full.max(-1, keepdims=True)
  tgt = np.asarray(ids)[:, 1:]
  m = valid[:, 1:] & valid[:, :-1]
  want = -np.sum(np.where(m, np.take_along_axis(logp[:, :-1], tgt[..., None], -1)[..., 0], 0))
  np.testing.assert_allclose(float(nll), want, rtol=1e-5)
  assert float(cnt) == m.sum()


def test_remat_forward_equals_model(seed):
  model = tiny_model(seed)
  ids = jax.random.randint(jax.random.key(seed), (1, 17), 0, 97)
  valid = jnp.ones((1, 17), bool)
  sq = jnp.arange(17)[None] >= 9
  a = nnx.jit(lambda m: losses.hidden_states(m, ids, valid=valid, sparse_queries=sq,
                                             remat=True))(model)
  b, _ = nnx.jit(lambda m: m.hidden_states(ids, valid=valid, sparse_queries=sq))(model)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
