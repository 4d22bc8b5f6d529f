"""MixedHeadAttention / RTPurbo model semantics on a tiny random model (fp32, CPU).

Oracles: the dense model (p = 1, window >= S is exactly dense), the one-shot prefill with
`sparse_queries` (step-by-step decode must reproduce it), a numpy brute-force attention
layer with the docs/DESIGN.md §1 visibility rules, and unpadded single rows.

Model-level equalities compare two float32 paths that may round a block-mass near-tie
differently, so they use fixed token draws (checked once); the brute-force layer test takes
fresh inputs every run and skips the rare ambiguous selections explicitly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax.attention.mixed import SelectionStats
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.convert import indexer_weights, set_distance_bias, to_rtpurbo
from rtpurbo_jax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500.0)
# GQA groups of 2. Layer 0: KV 0 serves a retrieval + a local head, KV 1 only local heads
# (a ring). Layer 1: both KV heads serve one retrieval and one local head.
PLAN = HeadPlan.from_mask([[1, 0, 0, 0], [0, 1, 1, 0]], 2)
BS = 16  # block size: several blocks inside short test sequences
S, P = 75, 23  # sequence length (not a multiple of BS), prompt length
SPARSE = dict(window=12, sinks=2, top_p=0.5, block_size=BS, indexer_dim=8,
              seqlen_threshold=0, topk_tokens=20)
ATOL = 2e-4


@functools.lru_cache(maxsize=None)
def dense_model(seed=0):
  # A large init scale makes attention sharp, so a wrong mask changes the logits visibly.
  return Transformer(CFG, dtype="float32", rngs=nnx.Rngs(seed), init_std=0.3)


def random_indexer(model, seed):
  """Random indexer weights (instead of the rotary init) so selection is non-trivial."""
  rng = np.random.default_rng(seed)
  return {l: tuple(rng.standard_normal(w.shape).astype(np.float32) * 0.7 for w in ws)
          for l, ws in indexer_weights(model).items()}


class Harness:
  """A model with a jitted decode step and sparse-query forward (compiled once per model
  and shape). Other one-shot calls run eagerly: eager primitives are compiled once for all
  models of the same shapes, which is cheaper on CPU than compiling every model's forward.
  """

  def __init__(self, model):
    self.model = model
    graphdef, self.state = nnx.split(model)

    @jax.jit
    def step(state, ids, cache):
      out, _ = nnx.capture(nnx.merge(graphdef, state), SelectionStats)(ids, cache=cache,
                                                                      phase="decode")
      return out

    @jax.jit
    def forward(state, ids, positions, valid, sparse_queries):
      return nnx.merge(graphdef, state)(ids, positions=positions, valid=valid,
                                        sparse_queries=sparse_queries)

    self._step, self._forward = step, forward

  def __call__(self, ids, *, positions=None, valid=None, sparse_queries=None):
    if sparse_queries is None:
      return self.model(ids, positions=positions, valid=valid)
    # Per-query selection maps over query chunks (lax.map): compile it once.
    return self._forward(self.state, ids, positions, valid, sparse_queries)

  def prefill(self, ids, cache, valid=None):
    return self.model(ids, cache=cache, valid=valid, phase="prefill")

  def step(self, ids, cache):
    return self._step(self.state, ids, cache)

  def cached(self, ids, prompt_len, valid=None, max_len=None):
    """Prefill `prompt_len` tokens through the cache, then decode the rest one at a time
    (teacher forcing). Returns logits [batch, seq, vocab]."""
    b, s = ids.shape
    cache = self.model.init_cache(b, max_len or S)
    pv = None if valid is None else valid[:, :prompt_len]
    out, cache = self.prefill(ids[:, :prompt_len], cache, pv)
    outs = [out]
    for i in range(prompt_len, s):
      out, cache = self.step(ids[:, i:i + 1], cache)
      outs.append(out)
    return jnp.concatenate(outs, axis=1)


@functools.lru_cache(maxsize=None)
def _harness(mode, seed, overrides):
  kw = dict(SPARSE)
  kw.update(overrides)
  if mode == "dense":
    return Harness(dense_model(seed))
  model = to_rtpurbo(dense_model(seed), PLAN, mode=mode, **kw)
  if mode in ("rtpurbo", "topk"):
    model = to_rtpurbo(model, PLAN, random_indexer(model, seed + 1), mode=mode, **kw)
  if kw.get("distance_buckets"):
    rng = np.random.default_rng(seed + 2)
    set_distance_bias(model, {l: rng.standard_normal((len(model.plan.layer(l).retrieval),
                                                      kw["distance_buckets"])) * 1.5
                              for l in indexer_weights(model)})
  return Harness(model)


def rtpurbo(mode="rtpurbo", seed=0, **overrides):
  return _harness(mode, seed, tuple(sorted(overrides.items())))


def dense(ids):
  return _harness("dense", 0, ())(ids)


def token_ids(seed, batch=1, length=S):
  """Random ids without repeats inside a row: a repeated token has the same layer-0 key, so
  two blocks could tie exactly in exact arithmetic and float32 rounding would pick either."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.stack([rng.permutation(CFG.vocab_size)[:length] for _ in range(batch)]),
                     jnp.int32)


def decode_queries(batch, length, prompt_len):
  return jnp.broadcast_to(jnp.arange(length) >= prompt_len, (batch, length))


def max_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


# ---------------------------------------------------------------------------
# p = 1, window >= S, threshold 0 is exactly dense.


@pytest.mark.parametrize("mode", ["rtpurbo", "topk", "streaming"])
def test_everything_selected_equals_dense(mode):
  ids = token_ids(1)
  want = dense(ids)
  model = rtpurbo(mode, top_p=1.0, window=S + 5, topk_tokens=S + BS)
  assert max_diff(model(ids), want) < ATOL
  assert max_diff(model(ids, sparse_queries=jnp.ones(ids.shape, bool)), want) < ATOL
  if mode == "rtpurbo":  # (topk and streaming decode are checked against prefill below)
    assert max_diff(model.cached(ids, P), want) < ATOL
    sp = rtpurbo(mode, top_p=1.0, window=S + 5, sparse_prefill=True)
    assert max_diff(sp(ids), want) < ATOL


def test_sparse_settings_change_the_logits():
  # The control for the equalities in this file: the sparse rules do bite on this model.
  ids = token_ids(1)
  want = dense(ids)
  q = decode_queries(1, S, P)
  for mode in ("rtpurbo", "topk", "streaming"):
    assert max_diff(rtpurbo(mode)(ids, sparse_queries=q), want) > 1e-2, mode
  # Retrieval heads alone (window >= S) also change the logits through block selection.
  only_ret = rtpurbo("rtpurbo", window=S + 5)
  assert max_diff(only_ret(ids, sparse_queries=q), want) > 1e-2


# ---------------------------------------------------------------------------
# Step-by-step decode == one prefill with sparse_queries on the decoded positions.


@pytest.mark.parametrize("mode", ["rtpurbo", "streaming", "topk"])
def test_decode_equals_prefill_with_sparse_queries(mode):
  model = rtpurbo(mode)
  ids = token_ids(2)
  want = model(ids, sparse_queries=decode_queries(1, S, P))
  # (The cache holds whole blocks: 80 slots for S = 75, so unused zero slots are present.)
  assert max_diff(model.cached(ids, P), want) < ATOL


def test_decode_equals_prefill_histogram_selector():
  # The histogram selector (a superset rule) is also one rule for both paths.
  model = rtpurbo("rtpurbo", selector="histogram")
  ids = token_ids(2)
  want = model(ids, sparse_queries=decode_queries(1, S, P))
  assert max_diff(model.cached(ids, P), want) < ATOL


def test_cached_forward_names_its_phase():
  model = rtpurbo("rtpurbo").model
  ids = token_ids(2)[:, :4]
  cache = model.init_cache(1, S)
  with pytest.raises(ValueError, match="phase"):
    model(ids, cache=cache)
  with pytest.raises(ValueError, match="one token"):
    model(ids, cache=cache, phase="decode")


# ---------------------------------------------------------------------------
# One layer vs a numpy brute force with the docs/DESIGN.md §1 rules (mixed GQA groups).


def _np_bucket(q_block, k_block, n):
  d = max(q_block - k_block, 0)
  return 0 if d == 0 else min(1 + int(np.floor(np.log2(d))), n - 1)


def _np_topp_blocks(scores, t, p, bs, floor=0, bias=None):
  """Selected blocks of one query (float64): top-p, plus the `floor` heaviest blocks; and
  whether float32 could differ. bias: the head's distance bias [n_buckets], added to every
  key's score by its block's distance bucket."""
  s = np.asarray(scores[: t + 1], np.float64)
  if bias is not None:
    s = s + np.array([bias[_np_bucket(t // bs, j // bs, len(bias))] for j in range(t + 1)])
  w = np.exp(s - s.max())
  w /= w.sum()
  mass = np.zeros(t // bs + 1)
  np.add.at(mass, np.arange(t + 1) // bs, w)
  order = sorted(range(len(mass)), key=lambda b: (-mass[b], b))
  sel, cum, ambiguous, n = {t // bs}, 0.0, False, 0
  for b in order:
    if cum >= p:
      break
    sel.add(b)
    cum += mass[b]
    n += 1
    ambiguous |= abs(cum - p) < 1e-5
  # Two nearly equal masses on both sides of the cut: float32 may rank them either way.
  if n < len(order):
    ambiguous |= 0 < abs(mass[order[n - 1]] - mass[order[n]]) < 1e-6
  sel.update(order[:floor])
  if 0 < floor < len(order):  # the floor ranks by log-mass: a relative near-tie
    ambiguous |= abs(np.log(mass[order[floor - 1]] / mass[order[floor]])) < 1e-5
  return sel, ambiguous


def _np_layer(attn, x, positions, sparse_queries, sp, inv_freq):
  """y [batch, seq, embed] by brute force; also the set of ambiguous (b, t) rows."""
  q_pre, k_pre, q, k, v = attn.project_qkv(x, positions, inv_freq)
  qi, ki = attn.indexer_qk(q_pre, k_pre)
  q, k, v, qi, ki = (np.asarray(a, np.float64) for a in (q, k, v, qi, ki))
  b, s, h, d = q.shape
  heads = attn.heads
  out = np.zeros_like(q)
  ambiguous = set()
  j = np.arange(s)
  for bi, hh, t in np.ndindex(b, h, s):
    kvh = heads.kv_of(hh)
    if hh in heads.retrieval:
      vis = j <= t
      if sparse_queries[bi, t]:
        r = heads.retrieval.index(hh)
        bias = None if attn.distance_bias is None else np.asarray(attn.distance_bias[r])
        sel, amb = _np_topp_blocks(ki[bi, :, r] @ qi[bi, t, r], t, sp.top_p, sp.block_size,
                                   sp.min_blocks, bias)
        if amb:
          ambiguous.add((bi, t))
        vis &= np.isin(j // sp.block_size, list(sel))
    else:
      vis = (j <= t) & ((j < sp.sinks) | (j > t - sp.window))
    logits = np.where(vis, k[bi, :, kvh] @ q[bi, t, hh] / np.sqrt(d), -np.inf)
    pr = np.exp(logits - logits.max())
    out[bi, t, hh] = (pr / pr.sum()) @ v[bi, :, kvh]
  y = np.einsum("bshd,hde->bse", out, np.asarray(attn.o_proj[...], np.float64))
  return y, ambiguous


@pytest.mark.parametrize("layer,floor,buckets", [(0, 0, 0), (1, 0, 0), (1, 2, 0), (1, 0, 4),
                                                 (0, 2, 3)])
def test_layer_matches_bruteforce_rules(layer, floor, buckets, rng):
  # Fresh inputs every run (the rng fixture); float32-ambiguous selections are skipped.
  extra = {**({"min_blocks": floor} if floor else {}),
           **({"distance_buckets": buckets} if buckets else {})}
  model = rtpurbo("rtpurbo", **extra).model
  attn = model.layers[layer].attn
  # Layer 0: a ring-only KV head and a mixed group; layer 1: two mixed groups.
  assert len(attn.routing.full_kv) and (layer == 1 or len(attn.routing.ring_kv))
  b = 2
  x = jnp.asarray(rng.standard_normal((b, S, CFG.hidden_size)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (b, S))
  sq = np.asarray(decode_queries(b, S, P))
  inv = model.inv_freq()
  want, ambiguous = _np_layer(attn, x, pos, sq, model.sparse, inv)
  assert len(ambiguous) <= 2
  keep = np.ones((b, S), bool)
  for bi, t in ambiguous:
    keep[bi, t] = False
  graphdef, state = nnx.split(attn)

  @jax.jit
  def step(state, x, pos, cache):
    out, _ = nnx.capture(nnx.merge(graphdef, state), SelectionStats)(x, pos, inv, cache=cache,
                                                                     phase="decode")
    return out

  # Prefill with sparse_queries.
  got, _ = attn(x, pos, inv, sparse_queries=jnp.asarray(sq))
  np.testing.assert_allclose(np.asarray(got)[keep], want[keep], atol=ATOL, rtol=1e-4)
  # Prefill P tokens through the layer cache, then decode one token at a time.
  y, cache = attn(x[:, :P], pos[:, :P], inv, cache=model.init_cache(b, S)[layer],
                  phase="prefill")
  ys = [y]
  for i in range(P, S):
    y, cache = step(state, x[:, i:i + 1], pos[:, i:i + 1], cache)
    ys.append(y)
  got_dec = np.asarray(jnp.concatenate(ys, axis=1))
  np.testing.assert_allclose(got_dec[keep], want[keep], atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------------
# The top-p floor (`min_blocks`).


def test_min_blocks_floor_is_one_rule_for_decode_and_prefill():
  ids = token_ids(2)
  q = decode_queries(1, S, P)
  floored = rtpurbo("rtpurbo", min_blocks=3)
  want = floored(ids, sparse_queries=q)
  assert max_diff(floored.cached(ids, P), want) < ATOL
  # The control: on this model the floor adds blocks that top-p 0.5 leaves out.
  assert max_diff(want, rtpurbo("rtpurbo")(ids, sparse_queries=q)) > 1e-3
  # A floor of every block is top-p 1: with a window >= S, exactly dense.
  every = rtpurbo("rtpurbo", min_blocks=-(-S // BS), window=S + 5)
  assert max_diff(every(ids, sparse_queries=q), dense(ids)) < ATOL
  assert max_diff(every.cached(ids, P), dense(ids)) < ATOL


# ---------------------------------------------------------------------------
# The indexer's distance bias (`distance_buckets`).


@pytest.mark.parametrize("mode,extra", [("rtpurbo", {}), ("rtpurbo", {"min_blocks": 2}),
                                        ("topk", {})])
def test_distance_bias_is_one_rule_for_decode_and_prefill(mode, extra):
  ids = token_ids(2)
  q = decode_queries(1, S, P)
  biased = rtpurbo(mode, distance_buckets=4, **extra)
  want = biased(ids, sparse_queries=q)
  assert max_diff(biased.cached(ids, P), want) < ATOL
  # The control: the bias changes which blocks this model reads.
  assert max_diff(want, rtpurbo(mode, **extra)(ids, sparse_queries=q)) > 1e-3


def test_distance_bias_zero_is_the_method():
  ids = token_ids(3)
  q = decode_queries(1, S, P)
  zero = to_rtpurbo(rtpurbo("rtpurbo").model, PLAN, distance_buckets=4, **SPARSE)
  assert all(float(jnp.max(jnp.abs(b))) == 0.0
             for b in (l.attn.distance_bias for l in zero.layers) if b is not None)
  want = rtpurbo("rtpurbo")(ids, sparse_queries=q)
  assert max_diff(Harness(zero)(ids, sparse_queries=q), want) == 0.0


def test_distance_bias_is_checked():
  from rtpurbo_jax.config import ConfigError, SparseConfig
  with pytest.raises(ConfigError, match="distance_buckets=-1"):
    SparseConfig(distance_buckets=-1)
  with pytest.raises(ConfigError, match="sparse_prefill"):
    SparseConfig(distance_buckets=4, sparse_prefill=True)
  model = rtpurbo("rtpurbo", distance_buckets=4).model
  with pytest.raises(Exception, match="shape"):
    set_distance_bias(model, {l: np.zeros((len(model.plan.layer(l).retrieval), 3))
                              for l in indexer_weights(model)})


def test_min_blocks_is_checked():
  from rtpurbo_jax.config import ConfigError, SparseConfig
  with pytest.raises(ConfigError, match="min_blocks=-1"):
    SparseConfig(min_blocks=-1)
  with pytest.raises(ConfigError, match="sparse_prefill"):
    SparseConfig(min_blocks=2, sparse_prefill=True)


# ---------------------------------------------------------------------------
# Dense fallback below seqlen_threshold.


@pytest.mark.parametrize("mode", ["rtpurbo", "streaming"])
def test_dense_fallback_below_threshold(mode):
  ids = token_ids(4)
  want = dense(ids)
  q = decode_queries(1, S, P)
  below = rtpurbo(mode, seqlen_threshold=S + 1)  # the context never reaches the threshold
  assert max_diff(below(ids), want) < ATOL
  assert max_diff(below(ids, sparse_queries=q), want) < ATOL
  if mode == "rtpurbo":  # local and retrieval heads both decode here
    assert max_diff(below.cached(ids, P), want) < ATOL
  at = rtpurbo(mode, seqlen_threshold=S)  # reached: the sparse rules apply
  assert max_diff(at(ids, sparse_queries=q), want) > 1e-2


def test_threshold_switches_decode_steps_individually():
  # Decode steps whose context is below the threshold run dense; later steps do not.
  thr = 50
  ids = token_ids(5)
  got = rtpurbo("rtpurbo", seqlen_threshold=thr).cached(ids, P)
  want = dense(ids)
  # Steps that see fewer than `thr` tokens (positions < thr - 1) equal dense.
  assert max_diff(got[:, : thr - 1], want[:, : thr - 1]) < ATOL
  assert max_diff(got[:, thr - 1:], want[:, thr - 1:]) > 1e-2


# ---------------------------------------------------------------------------
# Padded batches equal their unpadded rows.


@pytest.mark.parametrize("mode", ["rtpurbo", "streaming", "topk"])
def test_right_padded_batch_equals_rows(mode):
  model = rtpurbo(mode)
  lens = [S, 50]
  ids = token_ids(6, batch=2)
  valid = jnp.arange(S)[None, :] < jnp.asarray(lens)[:, None]
  ids = jnp.where(valid, ids, 0)
  sq = decode_queries(2, S, P) & valid
  batch = model(ids, valid=valid, sparse_queries=sq)
  for r, n in enumerate(lens):
    row = model(ids[r:r + 1, :n], sparse_queries=sq[r:r + 1, :n])
    assert max_diff(batch[r:r + 1, :n], row) < ATOL, (mode, r)


def test_left_padded_batch_dense_prefill_equals_rows():
  # Left padding: positions restart at 0 after the pads (retrieval heads dense in prefill).
  model = rtpurbo("rtpurbo")
  lens = [S, 41]
  ids = token_ids(7, batch=2)
  pad = np.array([S - n for n in lens])
  idx = np.arange(S)[None, :]
  valid = jnp.asarray(idx >= pad[:, None])
  pos = jnp.asarray(np.maximum(idx - pad[:, None], 0), jnp.int32)
  batch = model(ids, positions=pos, valid=valid)
  for r, n in enumerate(lens):
    row = model(ids[r:r + 1, S - n:])
    assert max_diff(batch[r:r + 1, S - n:], row) < ATOL, r


def test_padded_batch_decode_equals_rows():
  # Prompts of different lengths (right-padded) prefilled together, then decoded together:
  # each row continues at its own length.
  model = rtpurbo("rtpurbo")
  prompt = [P, 17]
  steps = S - P
  ids = token_ids(9, batch=2)
  cache = model.model.init_cache(2, S)
  pvalid = jnp.arange(P)[None, :] < jnp.asarray(prompt)[:, None]
  out, cache = model.prefill(jnp.where(pvalid, ids[:, :P], 0), cache, pvalid)
  got = [[out[r, : prompt[r]]] for r in range(2)]
  for i in range(steps):
    nxt = jnp.stack([ids[r, prompt[r] + i] for r in range(2)])[:, None]
    out, cache = model.step(nxt, cache)
    for r in range(2):
      got[r].append(out[r])
  for r in range(2):
    # The row alone, decode-style from its own prompt length on (decode == prefill with
    # sparse_queries is checked above).
    n = prompt[r] + steps
    want = model(ids[r:r + 1, :n], sparse_queries=decode_queries(1, n, prompt[r]))
    assert max_diff(jnp.concatenate(got[r], axis=0)[None], want) < ATOL, r


def test_layers_carry_named_scopes_for_profiles():
  model = dense_model()
  ids = jnp.zeros((1, 8), jnp.int32)
  graphdef, state = nnx.split(model)
  hlo = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)).lower(state, ids).as_text(
      debug_info=True)
  assert "attention/" in hlo and "mlp/" in hlo
