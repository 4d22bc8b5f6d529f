"""HeadPlan (plan.py) and the mixed KV cache (cache.py) vs hand-written oracles."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax.attention import cache as cache_lib
from rtpurbo_jax.attention.routing import head_routing
from rtpurbo_jax.attention.plan import HeadPlan, load_headwise_config
from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig
from rtpurbo_jax.infer.memory import memory_report

LLAMA31_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                         rope_theta=500000.0)


def random_plan(rng, layers=5, heads=8, kv=2, frac=0.3):
  return HeadPlan.from_mask(rng.random((layers, heads)) < frac, kv)


# ---------------------------------------------------------------------------
# headwise_config


def test_headwise_config_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  plan = random_plan(rng)
  sparse = SparseConfig(mode="rtpurbo", window=1024, sinks=8, top_p=0.85, block_size=32,
                        seqlen_threshold=4096, indexer_dim=8)
  d = plan.to_headwise_config(sparse)
  # The RTP-LLM keys, exactly.
  assert d["sink_token_num"] == 8 and d["swa_token_num"] == 1024
  assert d["seqlen_threshold"] == 4096
  assert d["0"] == [int(x) for x in plan.mask()[0]]
  # Through a config.json in a folder and through a bare JSON file.
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "config.json").write_text(json.dumps({"headwise_config": d}))
  (tmp_path / "plan.json").write_text(json.dumps(d))
  for src in (tmp_path / "m", tmp_path / "plan.json"):
    back, overrides = HeadPlan.from_headwise_config(load_headwise_config(str(src)), 2)
    assert back == plan
    rebuilt = SparseConfig(mode="rtpurbo", **overrides)
    for f in ("window", "sinks", "top_p", "block_size", "seqlen_threshold", "indexer_dim"):
      assert getattr(rebuilt, f) == getattr(sparse, f), f


def test_headwise_config_bad_input():
  with pytest.raises(ConfigError, match="0..N-1"):
    HeadPlan.from_headwise_config({"0": [1, 0], "2": [0, 1]}, 1)
  with pytest.raises(ConfigError, match="no per-layer"):
    HeadPlan.from_headwise_config({"sink_token_num": 4}, 1)
  with pytest.raises(ConfigError, match="multiple"):
    HeadPlan.from_headwise_config({"0": [1, 0, 0]}, 2)
  with pytest.raises(FileNotFoundError):
    load_headwise_config("/nonexistent/plan.json")


# ---------------------------------------------------------------------------
# Global ranking and derived KV head sets


@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.01, 1.0])
def test_from_scores_global_ranking(ratio):
  rng = np.random.default_rng(int(ratio * 100))
  layers, heads = 6, 8
  scores = rng.random((layers, heads))
  scores[2, 3] = scores[4, 1] = scores[1, 6]  # exact ties: earlier (layer, head) wins
  plan = HeadPlan.from_scores(scores, 4, ratio)
  n = max(1, math.floor(ratio * layers * heads + 1e-9))
  ranked = sorted(((-scores[l, h], l, h) for l in range(layers) for h in range(heads)))
  want = np.zeros((layers, heads), bool)
  for _, l, h in ranked[:n]:
    want[l, h] = True
  np.testing.assert_array_equal(plan.mask(), want)
  assert plan.summary()["retrieval_heads"] == n


def test_from_scores_is_global_not_per_layer():
  scores = np.zeros((4, 8))
  scores[3] = np.arange(1, 9)  # the last layer holds all the best heads
  plan = HeadPlan.from_scores(scores, 2, 0.25)  # 8 heads
  assert plan.summary()["per_layer"] == [0, 0, 0, 8]


def test_full_and_ring_kv_heads():
  rng = np.random.default_rng(1)
  for kv, heads in [(2, 8), (4, 8), (8, 8), (1, 4)]:
    plan = random_plan(rng, layers=6, heads=heads, kv=kv, frac=0.25)
    g = heads // kv
    for l in range(plan.num_layers):
      lh = plan.layer(l)
      ret = [h for h in range(heads) if plan.retrieval[l][h]]
      assert lh.retrieval == tuple(ret)
      assert lh.local == tuple(h for h in range(heads) if h not in ret)
      full = sorted({h // g for h in ret})
      assert lh.full_kv == tuple(full)
      assert lh.ring_kv == tuple(k for k in range(kv) if k not in full)
      for h in ret:
        assert lh.full_kv[lh.full_slot(h)] == h // g
      # Modes: dense keeps everything full, streaming everything in rings.
      assert head_routing(lh, "dense", heads, kv).full_kv == tuple(range(kv))
      assert head_routing(lh, "streaming", heads, kv).ring_kv == tuple(range(kv))
      routing = head_routing(lh, "rtpurbo", heads, kv)
      assert routing.selected.heads == tuple(ret) and routing.full_kv == tuple(full)


# ---------------------------------------------------------------------------
# Memory accounting


def _formula(cfg, plan, ctx, batch, sparse, dtype_bytes=2):
  """Bytes by hand: K and V per token per KV head over whole blocks of the context, a ring of
  ring_capacity slots per local-only KV head (+ an int32 position per slot in each layer that
  has a ring), r values per token per retrieval head for the compressed keys, and an int32
  length per row per layer."""
  m = plan.mask()
  g = cfg.num_heads // cfg.num_kv_heads
  full_per_layer = [int(m[l].reshape(cfg.num_kv_heads, g).any(1).sum()) for l in range(len(m))]
  full = sum(full_per_layer)
  ring = len(m) * cfg.num_kv_heads - full
  ring_layers = sum(1 for f in full_per_layer if f < cfg.num_kv_heads)
  kv_tok = 2 * cfg.head_dim * dtype_bytes
  t = -(-ctx // sparse.block_size) * sparse.block_size
  cap = max(sparse.sinks + sparse.window, sparse.seqlen_threshold)
  lengths = cfg.num_layers * 4 * batch
  return {
      "dense_bytes": cfg.num_layers * cfg.num_kv_heads * t * kv_tok * batch + lengths,
      "full_kv_bytes": full * t * kv_tok * batch,
      "ring_bytes": (ring * cap * kv_tok + ring_layers * cap * 4) * batch,
      "compressed_key_bytes": int(m.sum()) * t * sparse.indexer_dim * dtype_bytes * batch,
      "length_bytes": lengths,
  }


def test_memory_report_llama31_8b_at_1m_literal():
  # Heads 0-3 of every layer retrieval: one full KV head (of 8) per layer, 12.5% of q heads.
  mask = np.zeros((32, 32), bool)
  mask[:, :4] = True
  plan = HeadPlan.from_mask(mask, 8)
  rep = memory_report(LLAMA31_8B, plan, ctx=1 << 20)
  gib = 1 << 30
  # 32 L x 8 KV x 1M x (K+V) x 128 x bf16, + an int32 length per layer
  assert rep["dense_bytes"] == 128 * gib + 32 * 4
  assert rep["full_kv_bytes"] == 16 * gib
  # rings: 7 KV heads x 32 L x 16384 slots (= seqlen_threshold) x 512 B, + int32 positions
  assert rep["ring_bytes"] == 7 * 32 * 16384 * 512 + 32 * 16384 * 4
  assert rep["compressed_key_bytes"] == 4 * gib  # 128 heads x 1M x 16 x bf16
  assert rep["length_bytes"] == 32 * 4
  total = 20 * gib + 7 * 32 * 16384 * 512 + 32 * 16384 * 4 + 32 * 4
  assert rep["rtpurbo_bytes"] == total
  assert rep["ratio"] == pytest.approx((128 * gib + 32 * 4) / total)


@pytest.mark.parametrize("ctx,batch", [(1 << 20, 1), (8192, 2), (200_003, 3)])
def test_memory_report_llama31_8b_15pct_plan(ctx, batch):
  rng = np.random.default_rng(ctx % 997)
  scores = rng.random((32, 32))
  scores[16:] += 0.5  # retrieval heads mostly in the second half, as in the paper
  plan = HeadPlan.from_scores(scores, 8, 0.15)
  assert plan.summary()["retrieval_heads"] == 153  # floor(0.15 x 1024)
  sparse = SparseConfig(mode="rtpurbo")
  rep = memory_report(LLAMA31_8B, plan, ctx=ctx, batch=batch, sparse=sparse)
  want = _formula(LLAMA31_8B, plan, ctx, batch, sparse)
  for key, value in want.items():
    assert rep[key] == value, key
  assert rep["rtpurbo_bytes"] == sum(v for k, v in want.items() if k != "dense_bytes")
  if ctx == 1 << 20:
    print(f"\nLlama-3.1-8B @1M, 15% plan: dense {rep['dense_bytes'] / 2**30:.1f} GiB, "
          f"RTPurbo {rep['rtpurbo_bytes'] / 2**30:.1f} GiB, ratio {rep['ratio']:.2f}x")


# ---------------------------------------------------------------------------
# Cache writes


def _tok_value(b, pos, kvh):
  return 1000.0 * b + pos + 0.01 * kvh + 1.0  # nonzero, distinct per (row, position, head)


def _chunks(total):
  sizes = [5, 1, 12, 1, 1, 10, 3, 1]
  out, start = [], 0
  for s in sizes:
    if start >= total:
      break
    s = min(s, total - start)
    out.append((start, s))
    start += s
  return out


def test_cache_write_ring_keeps_sinks_and_newest():
  cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=4)
  sparse = SparseConfig(mode="rtpurbo", window=6, sinks=2, seqlen_threshold=0, block_size=8,
                        indexer_dim=2)
  plan = HeadPlan.from_mask([[True, False, False, False]], 2)  # KV 0 full, KV 1 ring
  lay = head_routing(plan.layer(0), "rtpurbo", 4, 2)
  batch, total = 2, 34
  lens = [34, 27]  # row 1 is shorter: its tail is padding (valid = False)
  cap = sparse.ring_capacity
  assert cap == 8
  c = cache_lib.init_layer_cache(lay, cfg, sparse, batch, total, jnp.float32)
  assert c.max_len == 40  # rounded up to whole blocks
  for start, n in _chunks(total):
    pos = np.arange(start, start + n)[None].repeat(batch, 0).astype(np.int32)
    valid = pos < np.array(lens)[:, None]
    k = np.zeros((batch, n, 2, 4), np.float32)
    for b_, i, kvh in np.ndindex(batch, n, 2):
      k[b_, i, kvh] = _tok_value(b_, pos[b_, i], kvh)
    ck = k[:, :, :1, :2] * 2.0
    c = cache_lib.write(c, lay, jnp.asarray(k), jnp.asarray(-k), jnp.asarray(ck),
                        jnp.asarray(pos), jnp.asarray(valid), sparse)
    # After every write: the ring holds the sinks and the newest (cap - sinks) tokens.
    for b_ in range(batch):
      seen = min(start + n, lens[b_])
      want = set(range(min(sparse.sinks, seen))) | set(
          range(max(sparse.sinks, seen - (cap - sparse.sinks)), seen))
      held = {int(p) for p in np.asarray(c.ring_pos[b_]) if p >= 0}
      assert held == want, (start, n, b_, held, want)
      for slot, p in enumerate(np.asarray(c.ring_pos[b_])):
        if p >= 0:  # the slot's K/V are that position's (ring KV head is KV head 1)
          np.testing.assert_array_equal(np.asarray(c.ring_k[b_, 0, slot]),
                                        np.full(4, _tok_value(b_, p, 1), np.float32))
          np.testing.assert_array_equal(np.asarray(c.ring_v[b_, 0, slot]),
                                        np.full(4, -_tok_value(b_, p, 1), np.float32))
  np.testing.assert_array_equal(np.asarray(c.length), lens)
  # Full cache: every valid position at its own index, nothing else written.
  for b_ in range(batch):
    fk = np.asarray(c.full_k[b_, 0, :, 0])
    want = np.array([_tok_value(b_, p, 0) if p < lens[b_] else 0.0 for p in range(40)],
                    np.float32)
    np.testing.assert_array_equal(fk, want)
    np.testing.assert_array_equal(np.asarray(c.ckeys[b_, 0, :, 0]), 2.0 * want)


def test_ring_slot_layout():
  # Sinks at their own slots; the rest cycles through the remaining capacity.
  slots = np.asarray(cache_lib.ring_slot(jnp.arange(20), 3, 8))
  np.testing.assert_array_equal(slots[:3], [0, 1, 2])
  np.testing.assert_array_equal(slots[3:], [3 + (p - 3) % 5 for p in range(3, 20)])


@pytest.mark.parametrize("mode", ["rtpurbo", "dense"])
def test_memory_report_counts_what_init_cache_allocates(mode, seed):
  """The report is the allocation: its bytes equal the arrays `init_cache` returns."""
  from flax import nnx
  from rtpurbo_jax.models.transformer import Transformer
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  mask = np.random.default_rng(seed).random((3, 4)) < 0.4
  mask[0] = False  # one layer with rings only
  plan = HeadPlan.from_mask(mask, 2)
  sparse = SparseConfig(mode=mode, block_size=16, window=32, sinks=4, seqlen_threshold=48,
                        indexer_dim=4)
  model = Transformer(cfg, sparse=sparse, plan=plan, dtype="bfloat16", rngs=nnx.Rngs(0))
  ctx, batch = 100, 2
  allocated = sum(x.nbytes for c in model.init_cache(batch, ctx) for x in jax.tree.leaves(c))
  rep = memory_report(cfg, plan, ctx, batch=batch, sparse=sparse)
  assert rep["rtpurbo_bytes" if mode == "rtpurbo" else "dense_bytes"] == allocated
