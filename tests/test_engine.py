"""Engine: chunked vs one-shot prefill, the contiguous fast path vs masked attention, sharded
vs single-device decode (8 host CPU devices from conftest), metrics, memory planning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import ops
from rtpurbo_jax import sharding
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, RopeScaling, SparseConfig
from rtpurbo_jax.infer import memory
from rtpurbo_jax.infer.engine import Engine, tree_bytes
from rtpurbo_jax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
PLAN = HeadPlan.from_mask([[1, 0, 0, 0], [0, 0, 0, 1]], 2)


def _model(seed, mode="rtpurbo", **sparse):
  kw = dict(mode=mode, window=8, sinks=2, seqlen_threshold=0, block_size=8, indexer_dim=8,
            top_p=0.6, chunk_size=16)
  kw.update(sparse)
  return Transformer(CFG, sparse=SparseConfig(**kw), plan=PLAN, rngs=nnx.Rngs(seed),
                     init_std=0.3)


def test_chunked_prefill_equals_one_shot(seed, rng):
  model = _model(seed)
  ids = rng.integers(0, CFG.vocab_size, (2, 30)).astype(np.int32)
  lengths = np.asarray([30, 17])
  eng = Engine(model)
  one = eng.generate(ids, 6, prompt_lengths=lengths)
  chunked = eng.generate(ids, 6, prompt_lengths=lengths, prefill_chunk=7)
  np.testing.assert_allclose(chunked.first_logits, one.first_logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(chunked.tokens, one.tokens)
  s = chunked.summary
  assert s["chunks"] == 5 and s["prompt_tokens"] == 47 and s["decode_steps"] == 5
  assert s["cache_bytes"] == tree_bytes(model.init_cache(2, 36))
  assert 0.0 < s["selected_fraction"] <= 1.0


def test_sparse_prefill_engine(seed, rng):
  """`sparse_prefill` in the engine: chunks rounded to whole blocks, the first token's logits
  equal the one-pass sparse forward, the prefill selection is reported; with top_p 1 every
  causal block is read, which is the paper mode (dense retrieval heads in prefill)."""
  ids = rng.integers(0, CFG.vocab_size, (1, 37)).astype(np.int32)
  sparse = _model(seed, sparse_prefill=True)
  res = Engine(sparse).generate(ids, 4, prefill_chunk=7)
  s = res.summary
  assert s["prefill_chunk"] == 8 and s["chunks"] == 5  # 7 -> one 8-token block
  want = np.asarray(sparse(ids))[0, -1]
  np.testing.assert_allclose(res.first_logits[0], want, atol=2e-5, rtol=1e-5)
  assert 0.0 < s["prefill_selected_fraction"] < 1.0
  paper = Engine(_model(seed)).generate(ids, 4, prefill_chunk=8)
  assert paper.summary["prefill_selected_fraction"] is None
  assert np.max(np.abs(paper.first_logits - res.first_logits)) > 1e-3
  every = Engine(_model(seed, sparse_prefill=True, top_p=1.0)).generate(ids, 4,
                                                                         prefill_chunk=8)
  paper_p1 = Engine(_model(seed, top_p=1.0)).generate(ids, 4, prefill_chunk=8)
  assert every.summary["prefill_selected_fraction"] == 1.0
  np.testing.assert_allclose(every.first_logits, paper_p1.first_logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(every.tokens, paper_p1.tokens)


@pytest.mark.parametrize("mode", ["rtpurbo", "dense"])
def test_contiguous_fast_path_equals_masked_path(mode, seed, rng):
  """Prefill chunks through causal/window fast paths == the general masked attention.

  threshold 12 with window 8: the first chunk runs dense (inactive), later ones sparse; row 1
  ends at 10 tokens, so one chunk has an active and an inactive row.
  """
  model = _model(seed, mode, seqlen_threshold=12)
  graphdef, state = nnx.split(model)

  def step(cache, ids, p0, lengths, contiguous):
    m = nnx.merge(graphdef, state)
    pos = jnp.broadcast_to(p0 + jnp.arange(ids.shape[1]), ids.shape)
    return m(ids, positions=pos, valid=pos < lengths[:, None], cache=cache, phase="prefill",
             contiguous=contiguous)

  step = jax.jit(step, static_argnames="contiguous")
  ids = rng.integers(0, CFG.vocab_size, (2, 35)).astype(np.int32)
  lengths = jnp.asarray([35, 10])
  caches = {c: model.init_cache(2, 40) for c in (True, False)}
  for p0 in range(0, 35, 7):
    out = {}
    for c in (True, False):
      out[c], caches[c] = step(caches[c], ids[:, p0:p0 + 7], p0, lengths, contiguous=c)
    real = (p0 + np.arange(7))[None] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(out[True])[real], np.asarray(out[False])[real],
                               atol=2e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(caches[True]), jax.tree.leaves(caches[False])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("sparse_prefill", [False, True])
def test_sharded_equals_single_device(sparse_prefill, seed, rng):
  assert jax.device_count() >= 8, "conftest provides 8 host CPU devices"
  mesh = sharding.make_mesh({"tensor": 2, "context": 4}, jax.devices()[:8])
  ids = rng.integers(0, CFG.vocab_size, (2, 20)).astype(np.int32)
  kw = dict(prompt_lengths=[20, 11], max_len=64, prefill_chunk=8)
  single = Engine(_model(seed, sparse_prefill=sparse_prefill)).generate(ids, 8, **kw)
  eng = Engine(_model(seed, sparse_prefill=sparse_prefill), mesh=mesh)
  cache = eng.new_cache(2, 64)
  assert cache[0].ckeys.sharding.spec[2] == "context"  # compressed keys split over sequence
  assert cache[1].full_k.sharding.spec[2] == "context"
  assert tree_bytes(cache, per_device=True) < tree_bytes(cache)
  sharded = eng.generate(ids, 8, **kw)
  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  np.testing.assert_allclose(sharded.first_logits, single.first_logits, atol=1e-5)
  assert sharded.summary["selected_fraction"] == pytest.approx(
      single.summary["selected_fraction"], abs=1e-6)
  assert sharded.summary["devices"] == 8
  if sparse_prefill:
    assert sharded.summary["prefill_selected_fraction"] == pytest.approx(
        single.summary["prefill_selected_fraction"], abs=1e-6)


def test_topp_select_over_sequence_sharded_ckeys(rng):
  mesh = sharding.make_mesh({"tensor": 2, "context": 4}, jax.devices()[:8])
  qi = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  ckeys = jnp.asarray(rng.normal(size=(2, 4, 256, 8)) * 2, jnp.float32)
  lengths = jnp.asarray([256, 77])
  select = jax.jit(lambda q, c, n: ops.topp_select(q, c, n, top_p=0.8, block_size=16))
  want = np.asarray(select(qi, ckeys, lengths))
  placed = jax.device_put(ckeys, NamedSharding(mesh, P(None, "tensor", "context", None)))
  got = np.asarray(select(qi, placed, lengths))
  np.testing.assert_array_equal(got, want)
  assert 0 < want.sum() < want.size  # a real selection, not everything / nothing


# ---------------------------------------------------------------------------
# Memory planning.

LLAMA8B = ModelConfig(family="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128, rope_theta=500000.0, rope_scaling=RopeScaling(),
                      max_position_embeddings=131072)


def test_planner_llama8b_1m_on_h200():
  plan = memory.synthetic_plan(LLAMA8B, 0.15)
  kw = dict(dtype="bfloat16", device_memory=memory.parse_bytes("141G"), n_devices=1,
            prefill_chunk=65536)
  dense = memory.plan_memory(LLAMA8B, SparseConfig(mode="dense"), plan, 1 << 20, **kw)
  with pytest.raises(memory.MemoryPlanError, match=r"141\.00 GB.*largest context that fits"):
    memory.check_memory(dense)
  assert dense.cache_bytes == 32 * 8 * (1 << 20) * 128 * 2 * 2 + 32 * 4  # K, V bf16 + lengths
  assert 512 * 1024 <= dense.max_ctx < 1 << 20
  sparse = memory.check_memory(
      memory.plan_memory(LLAMA8B, SparseConfig(mode="rtpurbo"), plan, 1 << 20, **kw))
  assert sparse.fits and sparse.cache_bytes < 0.6 * dense.cache_bytes
  indexer = 153 * 2 * 16 * 128 * 4  # W_q, W_k per retrieval head, float32
  assert sparse.weight_bytes == 2 * LLAMA8B.num_params() + indexer


@pytest.mark.parametrize("mode", ["rtpurbo", "dense", "streaming"])
def test_planner_bytes_match_allocation(mode, seed):
  model = _model(seed, mode, seqlen_threshold=16)
  mesh = sharding.make_mesh({"tensor": 2, "context": 4}, jax.devices()[:8])
  shape = {"tensor": 2, "context": 4}
  mem = memory.plan_memory(CFG, model.sparse, PLAN, 200, batch=3, dtype="float32",
                           mesh_shape=shape, device_memory=1 << 30, n_devices=8)
  cache = Engine(model, mesh=mesh).new_cache(3, 200)
  assert mem.cache_bytes == tree_bytes(cache)
  assert mem.cache_bytes_per_device == tree_bytes(cache, per_device=True)
  params = nnx.state(model, nnx.Param)
  assert mem.weight_bytes == tree_bytes(params)
  assert mem.weight_bytes_per_device == tree_bytes(params, per_device=True)
  # max_ctx is the boundary: it fits, one block more does not.
  if mode != "streaming":  # a streaming cache stops growing with ctx
    budget = mem.total_per_device + 4096
    at = lambda n: memory.plan_memory(CFG, model.sparse, PLAN, n, batch=3, dtype="float32",
                                      mesh_shape=shape, device_memory=budget, n_devices=8)
    m = at(200).max_ctx
    assert m >= 200 and at(m).fits and not at(m + model.sparse.block_size).fits


def test_parse_bytes():
  assert memory.parse_bytes("141G") == 141 * 10**9
  assert memory.parse_bytes("80GB") == 80 * 10**9
  assert memory.parse_bytes("139GiB") == 139 * 2**30
  assert memory.parse_bytes(1234) == 1234
  with pytest.raises(ValueError, match="memory size"):
    memory.parse_bytes("lots")
