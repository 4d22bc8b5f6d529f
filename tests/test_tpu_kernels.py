"""TPU (Mosaic) kernels in the TPU interpreter vs their jnp references.

Every kernel runs under `pltpu.InterpretParams(detect_races=True)`: the interpreter
simulates TPU memory, DMAs and semaphores and its happens-before race detector must stay
silent. The interpreter fills every output buffer with NaN (floats) or INT_MAX (ints)
before the kernel runs, so an output element the kernel forgets to write shows up as a
mismatch: outputs are poisoned. Inputs are fresh random draws each run (the seed is
printed on failure). Shapes are small (S <= 512, head_dim 128: TPU tiles want 128 lanes).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import reference as ref
from pallas_kernels.config import KernelConfig
from pallas_kernels.tpu import Unsupported
from pallas_kernels.tpu import ring_decode as ring_k
from pallas_kernels.tpu import sparse_decode as decode_k
from pallas_kernels.tpu import sparse_prefill as prefill_k
from pallas_kernels.tpu import topp_select as topp_k
from pallas_kernels.tpu import window_attention as window_k

RACES = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_keys(n):
  seed = int(np.random.SeedSequence().entropy % (2**31))
  print(f"seed={seed}")
  return jax.random.split(jax.random.PRNGKey(seed), n)


def run(fn, *args, **kwargs):
  """Run one kernel call in the interpreter and require that no race was detected."""
  out = jax.block_until_ready(fn(*args, interpret=RACES, **kwargs))
  assert tpu_interpret.races is not None, "the kernel did not run in the TPU interpreter"
  assert not tpu_interpret.races.races_found, "the TPU interpreter detected a data race"
  return out


def assert_attention(out, lse, ref_out, ref_lse, tol):
  out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  fin = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=tol, rtol=tol)
  np.testing.assert_allclose(out, ref_out, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------
# Sink + window / causal prefill.

WINDOW_CASES = {
    # name: (dtype, batch, q_len, kv_len, q_offset, kv_heads, n_kv, sinks, window, blocks)
    "window_gqa": (jnp.float32, 2, 384, 384, 0, (0, 1, 1, 0), 2, 4, 150, 128),
    "window_covers_all": (jnp.float32, 1, 256, 256, 0, (0,), 1, 4, 10_000, 128),
    "causal_offset_ragged": (jnp.float32, 1, 128, 300, 172, (1, 0), 2, 0, None, 128),
    "window_bf16_ragged": (jnp.bfloat16, 1, 200, 200, 0, (0, 0, 0), 1, 8, 64, 512),
}


@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_window_attention(name):
  dtype, b, sq, skv, off, kvh, hkv, sinks, window, blk = WINDOW_CASES[name]
  kq, kk, kv = fresh_keys(3)
  q = jax.random.normal(kq, (b, sq, len(kvh), 128), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, skv, hkv, 128), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, skv, hkv, 128), jnp.float32).astype(dtype)
  if window is None:
    out, lse = run(window_k.causal_attention, q, k, v, kvh, q_offset=off, block_q=blk,
                   block_k=blk)
    want = ref.causal_attention(q, k, v, kvh, q_offset=off)
  else:
    out, lse = run(window_k.window_attention, q, k, v, kvh, sinks=sinks, window=window,
                   q_offset=off, block_q=blk, block_k=blk)
    want = ref.window_attention(q, k, v, kvh, sinks=sinks, window=window, q_offset=off)
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3]
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  assert_attention(out, lse, *want, tol)
  if window is not None and window >= skv + off:  # the local rule covers everything: dense
    assert_attention(out, lse, *ref.causal_attention(q, k, v, kvh, q_offset=off), tol)


def test_window_attention_gradients_match_reference():
  """The kernel is differentiable (custom VJP, reference backward): training can use it."""
  kq, kk, kv, kw = fresh_keys(4)
  q = jax.random.normal(kq, (1, 256, 1, 128), jnp.float32)
  k = jax.random.normal(kk, (1, 256, 1, 128), jnp.float32)
  v = jax.random.normal(kv, (1, 256, 1, 128), jnp.float32)
  w = jax.random.normal(kw, q.shape, jnp.float32)
  rule = dict(sinks=4, window=10_000)  # the "window_covers_all" kernel: already compiled

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v, (0,), **rule)
    return jnp.sum(out * w) + jnp.sum(jnp.sin(lse))

  kernel = functools.partial(window_k.window_attention, block_q=128, block_k=128,
                             interpret=RACES)
  got = jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(functools.partial(loss, ref.window_attention), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
  assert not tpu_interpret.races.races_found


def test_window_geometry_visits_each_visible_block_once():
  """The kv-step schedule (shared by index map and body) vs a brute-force block set."""
  for sq, skv, bq, bk, off, sinks, window in [(384, 384, 128, 128, 0, 4, 150),
                                              (512, 1024, 128, 256, 512, 130, 100),
                                              (256, 256, 128, 128, 0, 0, None)]:
    geo = window_k._geometry(sq, skv, bq, bk, off, sinks, window)
    for i in range(-(-sq // bq)):
      seen = []
      for j in range(geo.steps):
        blk, active = geo.kv_block(jnp.int32(i), jnp.int32(j))
        if bool(active):
          seen.append(int(blk))
      qs = np.arange(i * bq, min((i + 1) * bq, sq)) + off
      ks = np.arange(skv)
      vis = ks[None] <= qs[:, None]
      if window is not None:
        vis &= (ks[None] < sinks) | (ks[None] > qs[:, None] - window)
      want = sorted(set(np.broadcast_to(ks[None] // bk, vis.shape)[vis].tolist()))
      assert sorted(seen) == want and len(seen) == len(set(seen)), (i, seen, want)


# ---------------------------------------------------------------------------
# Decode top-p selection.


def _selection_inputs(kq, kc, dtype, t=512):
  qi = jax.random.normal(kq, (2, 3, 16), jnp.float32) * 1.5
  ck = jax.random.normal(kc, (2, 3, t, 16), jnp.float32).astype(dtype)
  lengths = jnp.asarray([t - 37, 100], jnp.int32)  # ragged, not block-aligned
  return qi, ck, lengths


def test_topp_select_exact_random():
  kq, kc = fresh_keys(2)
  qi, ck, lengths = _selection_inputs(kq, kc, jnp.float32)
  for p in (0.3, 0.9, 1.0):  # top_p is traced: one compiled kernel serves every p
    got = run(topp_k.topp_select, qi, ck, lengths, top_p=p)
    want = ref.topp_select(qi, ck, lengths, top_p=p)
    np.testing.assert_array_equal(got, want, err_msg=f"top_p={p}")
  nb_valid = -(-np.asarray(lengths) // 64)
  np.testing.assert_array_equal(np.asarray(got).sum(-1), np.broadcast_to(nb_valid[:, None],
                                                                         (2, 3)))


def test_topp_select_with_block_offset():
  """A per-block log-mass offset (the indexer's distance bias): the kernel equals the
  reference with the same offset, directly and through the dispatch, for both selectors; the
  offset changes the selection (the control)."""
  from pallas_kernels import ops

  kq, kc, ko = fresh_keys(3)
  qi, ck, lengths = _selection_inputs(kq, kc, jnp.float32)
  offset = jax.random.normal(ko, (2, 3, ck.shape[2] // 64), jnp.float32) * 2
  for selector in ("exact", "histogram"):
    got = run(topp_k.topp_select, qi, ck, lengths, top_p=0.7, selector=selector,
              block_offset=offset)
    want = ref.topp_select(qi, ck, lengths, top_p=0.7, selector=selector, block_offset=offset)
    np.testing.assert_array_equal(got, want, err_msg=selector)
  assert bool(jnp.any(got != ref.topp_select(qi, ck, lengths, top_p=0.7, selector=selector)))
  kernels = KernelConfig("tpu", interpret=True)
  assert ops.supports("topp_select", qi, ck, lengths, top_p=0.7, block_offset=offset,
                      kernels=kernels)
  np.testing.assert_array_equal(
      ops.topp_select(qi, ck, lengths, top_p=0.7, block_offset=offset, kernels=kernels),
      ref.topp_select(qi, ck, lengths, top_p=0.7, block_offset=offset))


def test_topp_select_ties_and_own_block_only():
  """Row 0: identical keys (every block ties: lower index first). Row 1: the own block holds
  nearly all the mass, so only it is selected."""
  kq, kc = fresh_keys(2)
  qi, ck, _ = _selection_inputs(kq, kc, jnp.float32)
  t = ck.shape[2]
  lengths = jnp.asarray([t, 300], jnp.int32)
  ck = ck.at[0].set(1.0)
  own = (300 - 1) // 64
  ck = ck.at[1].multiply(0.01).at[1, :, own * 64:300].set(qi[1, :, None, :])
  got = run(topp_k.topp_select, qi, ck, lengths, top_p=0.5)
  want = ref.topp_select(qi, ck, lengths, top_p=0.5)
  np.testing.assert_array_equal(got, want)
  # 8 equal blocks, p = 0.5: the first four; the own block (7) is added.
  np.testing.assert_array_equal(np.asarray(got[0, 0]), [1, 1, 1, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(np.asarray(got[1]), np.eye(8, dtype=bool)[[own] * 3])


def test_topp_select_histogram_bf16():
  kq, kc = fresh_keys(2)
  qi, ck, lengths = _selection_inputs(kq, kc, jnp.bfloat16, t=256)
  got = run(topp_k.topp_select, qi, ck, lengths, top_p=0.9, selector="histogram")
  np.testing.assert_array_equal(
      got, ref.topp_select(qi, ck, lengths, top_p=0.9, selector="histogram"))
  exact = ref.topp_select(qi, ck, lengths, top_p=0.9)
  assert bool(jnp.all(got | ~exact)), "histogram selection must be a superset of exact top-p"


def test_prefill_select():
  """Sparse-prefill selection: one selection row per query block (pooled query)."""
  kq, kk = fresh_keys(2)
  qi = jax.random.normal(kq, (2, 256, 3, 16), jnp.float32) * 2.0
  ki = jax.random.normal(kk, (2, 256, 3, 16), jnp.float32).astype(jnp.bfloat16)
  for p in (0.5, 0.9, 1.0):
    got = run(topp_k.prefill_select, qi, ki, top_p=p)
    np.testing.assert_array_equal(got, ref.prefill_select(qi, ki, top_p=p), err_msg=f"p={p}")
  np.testing.assert_array_equal(got, np.broadcast_to(np.tril(np.ones((4, 4), bool)), got.shape))


def test_block_list_padding():
  mask = jnp.asarray([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  blocks, count = topp_k.block_list(mask)
  np.testing.assert_array_equal(count, [3, 0, 6])
  np.testing.assert_array_equal(blocks, [[1, 3, 4, 4, 4, 4], [0] * 6, [0, 1, 2, 3, 4, 5]])
  blocks, count = topp_k.block_list(mask, 4)
  np.testing.assert_array_equal(blocks[0], [1, 3, 4, 4])
  np.testing.assert_array_equal(count, [3, 0, 4])


# ---------------------------------------------------------------------------
# Sparse decode.


def _decode_masks(key, b, hq, nb, lengths):
  mask = jax.random.bernoulli(key, 0.3, (b, hq, nb))
  mask = mask.at[0, 0].set(True)  # select everything: must equal dense
  own = (np.asarray(lengths) - 1) // 64
  mask = mask.at[:, 1].set(jax.nn.one_hot(own, nb, dtype=bool))  # own block only
  return mask.at[1, 3].set(False)  # nothing selected: zeros and lse = -inf


@pytest.mark.parametrize("dtype,kvh,t,bps,impl", [
    (jnp.float32, (0, 0, 2, 0, 2), 512, 2, "pipeline"),  # mixed GQA groups, 4 grid steps
    (jnp.bfloat16, (1,) * 9 + (0,), 256, 8, "pipeline"),  # a group of 9 heads is split
    (jnp.float32, (0, 0, 2, 0, 2), 512, 2, "loop"),  # DMA loop, dynamic trip count
])
def test_sparse_decode(dtype, kvh, t, bps, impl):
  b, hkv, d, hq = 2, 3, 128, len(kvh)
  kq, kk, kv, km = fresh_keys(4)
  q = jax.random.normal(kq, (b, hq, d), jnp.float32).astype(dtype)
  kc = jax.random.normal(kk, (b, hkv, t, d), jnp.float32).astype(dtype)
  vc = jax.random.normal(kv, (b, hkv, t, d), jnp.float32).astype(dtype)
  lengths = jnp.asarray([t - 10, 130], jnp.int32)
  mask = _decode_masks(km, b, hq, t // 64, lengths)
  out, lse = run(decode_k.sparse_decode, q, kc, vc, kvh, mask, lengths, blocks_per_step=bps,
                 impl=impl)
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:2]
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  assert_attention(out, lse, *ref.sparse_decode(q, kc, vc, kvh, mask, lengths), tol)
  assert not np.isfinite(lse[1, 3]) and not np.any(np.asarray(out[1, 3], np.float32))
  # Head 0 of row 0 selected everything: plain causal decode attention.
  pos = jnp.where(jnp.arange(t) < lengths[0], jnp.arange(t), -1)[None].astype(jnp.int32)
  dense = ref.masked_attention(q[:1, None, :1], jnp.swapaxes(kc[:1], 1, 2),
                               jnp.swapaxes(vc[:1], 1, 2), lengths[:1, None] - 1, pos,
                               kvh[:1])
  assert_attention(out[:1, :1], lse[:1, :1], dense[0][:, 0], dense[1][:, 0], tol)


def test_sparse_decode_lists():
  """Union lists per KV-head group: ascending, head bits, padding repeats the last entry."""
  groups = decode_k.gqa_groups((0, 1, 0))
  assert groups == ((0, (0, 2)), (1, (1,)))
  mask = jnp.asarray([[[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]]], bool)
  lists, count = decode_k.group_lists(mask, jnp.asarray([256]), groups, block_size=64, slots=6)
  s = decode_k.HEAD_SHIFT
  np.testing.assert_array_equal(count, [[3, 0]])
  # Group 0 = heads (0, 2): block 0 by head 0 (bit 0), 2 by head 2 (bit 1), 3 by both.
  want = [0 | 1 << s, 2 | 2 << s, 3 | 3 << s] + [3 | 3 << s] * 3
  np.testing.assert_array_equal(lists[0, 0], want)
  # Blocks past the length are dropped from the list.
  _, count = decode_k.group_lists(mask, jnp.asarray([100]), groups, block_size=64, slots=6)
  np.testing.assert_array_equal(count, [[1, 0]])


# ---------------------------------------------------------------------------
# Sparse prefill.


@pytest.mark.parametrize("dtype,b,s,kvh,tile,per_iter", [
    (jnp.float32, 1, 320, (1, 0, 1), 128, 2),  # 5 query blocks: padded to whole tiles
    (jnp.bfloat16, 2, 128, (0, 0, 0), 256, 4),
])
def test_sparse_prefill(dtype, b, s, kvh, tile, per_iter):
  hq, nb = len(kvh), s // 64
  kq, kk, kv, km = fresh_keys(4)
  q = jax.random.normal(kq, (b, s, hq, 128), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, s, 2, 128), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, s, 2, 128), jnp.float32).astype(dtype)
  mask = jax.random.bernoulli(km, 0.4, (b, hq, nb, nb)) | jnp.eye(nb, dtype=bool)
  mask = mask.at[:, 1].set(True)  # everything (the non-causal half must be ignored)
  mask = mask.at[:, 2].set(jnp.eye(nb, dtype=bool))  # own block only
  out, lse = run(prefill_k.sparse_prefill, q, k, v, kvh, mask, q_tile=tile,
                 blocks_per_iter=per_iter)
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3]
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  assert_attention(out, lse, *ref.sparse_prefill(q, k, v, kvh, mask), tol)
  dense = ref.causal_attention(q[:, :, 1:2], k, v, kvh[1:2])
  assert_attention(out[:, :, 1:2], lse[:, :, 1:2], *dense, tol)
  # Own block only: each query sees the keys of its own block up to itself.
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  per_query = jnp.repeat(jnp.eye(nb, dtype=bool), 64, axis=0)  # [s, nb]
  own = ref.masked_attention(q[:, :, 2:3], k, v, pos, pos, kvh[2:3],
                             key_block_mask=jnp.broadcast_to(per_query, (b, 1, s, nb)))
  assert_attention(out[:, :, 2:3], lse[:, :, 2:3], *own, tol)


# ---------------------------------------------------------------------------
# Ring decode (local heads).


def test_ring_decode():
  b, hkv, cap, d, kvh = 2, 2, 96, 128, (1, 1, 0)
  kq, kk, kv = fresh_keys(3)
  q = jax.random.normal(kq, (b, len(kvh), d), jnp.float32)
  rk = jax.random.normal(kk, (b, hkv, cap, d), jnp.float32)
  rv = jax.random.normal(kv, (b, hkv, cap, d), jnp.float32)
  slots = np.arange(cap)
  pos = jnp.asarray(np.stack([slots * 3, np.where(slots < 50, slots, -1)]), jnp.int32)
  q_pos = jnp.asarray([200, 49], jnp.int32)
  active = jnp.asarray([True, False])  # row 1: dense fallback below the threshold
  out, lse = run(ring_k.ring_decode, q, rk, rv, pos, kvh, q_pos, sinks=4, window=40,
                 sparse_active=active, chunk=32)
  assert_attention(out, lse, *ref.ring_decode(q, rk, rv, pos, kvh, q_pos, sinks=4, window=40,
                                              sparse_active=active), 2e-5)


# ---------------------------------------------------------------------------
# Dispatch through pallas_kernels.ops.


def test_ops_route_to_tpu_kernels():
  from pallas_kernels import ops
  from pallas_kernels.tpu import dispatch

  kernels = KernelConfig.from_env({"RTPURBO_KERNELS": "tpu", "RTPURBO_INTERPRET": "races"})
  assert kernels == KernelConfig("tpu", interpret=True, detect_races=True)
  assert dispatch.interpret_params(kernels) == RACES  # same jit cache entries as above
  kq, kc = fresh_keys(2)
  qi, ck, lengths = _selection_inputs(kq, kc, jnp.float32)
  got = jax.block_until_ready(ops.topp_select(qi, ck, lengths, top_p=0.9, kernels=kernels))
  assert not tpu_interpret.races.races_found
  np.testing.assert_array_equal(got, ref.topp_select(qi, ck, lengths, top_p=0.9))
  # head_dim 64 does not tile on TPU: no kernel, and ops runs the reference instead.
  q = jax.random.normal(kq, (1, 64, 2, 64), jnp.float32)
  assert dispatch.causal_attention(q, q, q, (0, 1), kernels=kernels) is None
  out, _ = ops.causal_attention(q, q, q, (0, 1), kernels=kernels)
  np.testing.assert_array_equal(out, ref.causal_attention(q, q, q, (0, 1))[0])


def _sds(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


# (op, kernel, arguments, keyword arguments, tiles): shapes on both sides of every tiling rule.
I32 = jnp.int32
SUPPORT_CASES = [
    ("causal_attention", window_k.causal_attention,
     (_sds(1, 256, 2, 128), _sds(1, 256, 1, 128), _sds(1, 256, 1, 128), (0, 0)), {}, True),
    ("causal_attention", window_k.causal_attention,  # head_dim 64: not one lane block
     (_sds(1, 256, 2, 64), _sds(1, 256, 1, 64), _sds(1, 256, 1, 64), (0, 0)), {}, False),
    ("window_attention", window_k.window_attention,
     (_sds(1, 256, 2, 256), _sds(1, 384, 1, 256), _sds(1, 384, 1, 256), (0, 0)),
     dict(sinks=4, window=64, q_offset=128), True),
    ("window_attention", window_k.window_attention,
     (_sds(1, 256, 2, 96), _sds(1, 256, 1, 96), _sds(1, 256, 1, 96), (0, 0)),
     dict(sinks=4, window=64), False),
    ("ring_decode", ring_k.ring_decode,
     (_sds(2, 3, 64), _sds(2, 2, 256, 64), _sds(2, 2, 256, 64), _sds(2, 256, dtype=I32),
      (0, 1, 1), _sds(2, dtype=I32)), dict(sinks=4, window=40), True),
    ("ring_decode", ring_k.ring_decode,  # no chunk size divides 200 slots
     (_sds(2, 3, 64), _sds(2, 2, 200, 64), _sds(2, 2, 200, 64), _sds(2, 200, dtype=I32),
      (0, 1, 1), _sds(2, dtype=I32)), dict(sinks=4, window=40), False),
    ("ring_decode", ring_k.ring_decode,  # head_dim 192: output rows not whole vregs
     (_sds(2, 3, 192), _sds(2, 2, 256, 192), _sds(2, 2, 256, 192), _sds(2, 256, dtype=I32),
      (0, 1, 1), _sds(2, dtype=I32)), dict(sinks=4, window=40), False),
    ("sparse_decode", decode_k.sparse_decode,
     (_sds(1, 2, 128), _sds(1, 2, 512, 128), _sds(1, 2, 512, 128), (0, 1),
      _sds(1, 2, 8, dtype=bool), _sds(1, dtype=I32)), dict(block_size=64), True),
    ("sparse_decode", decode_k.sparse_decode,  # block 8: below the minimum of 16
     (_sds(1, 2, 128), _sds(1, 2, 512, 128), _sds(1, 2, 512, 128), (0, 1),
      _sds(1, 2, 64, dtype=bool), _sds(1, dtype=I32)), dict(block_size=8), False),
    ("sparse_decode", decode_k.sparse_decode,  # head_dim 160: output rows not whole vregs
     (_sds(1, 2, 160), _sds(1, 2, 512, 160), _sds(1, 2, 512, 160), (0, 1),
      _sds(1, 2, 8, dtype=bool), _sds(1, dtype=I32)), dict(block_size=64), False),
    ("sparse_prefill", prefill_k.sparse_prefill,
     (_sds(1, 256, 2, 128), _sds(1, 256, 1, 128), _sds(1, 256, 1, 128), (0, 0),
      _sds(1, 2, 4, 4, dtype=bool)), dict(block_size=64), True),
    ("sparse_prefill", prefill_k.sparse_prefill,
     (_sds(1, 256, 2, 64), _sds(1, 256, 1, 64), _sds(1, 256, 1, 64), (0, 0),
      _sds(1, 2, 4, 4, dtype=bool)), dict(block_size=64), False),
    ("topp_select", topp_k.topp_select,
     (_sds(1, 2, 16), _sds(1, 2, 512, 16), _sds(1, dtype=I32)), dict(top_p=0.9), True),
    ("topp_select", topp_k.topp_select,  # r 24 does not divide 128 lanes
     (_sds(1, 2, 24), _sds(1, 2, 512, 24), _sds(1, dtype=I32)), dict(top_p=0.9), False),
    ("prefill_select", topp_k.prefill_select,
     (_sds(1, 256, 2, 16), _sds(1, 256, 2, 16)), dict(top_p=0.9), True),
    ("prefill_select", topp_k.prefill_select,  # block 16 < 128 / r = 32 keys per lane row
     (_sds(1, 256, 2, 4), _sds(1, 256, 2, 4)), dict(top_p=0.9, block_size=16), False),
]


@pytest.mark.parametrize("case", SUPPORT_CASES, ids=lambda c: f"{c[0]}-{c[4]}")
def test_supports_agrees_with_the_kernels(case):
  """`ops.supports` on the tpu backend == the kernel traces without `Unsupported` (abstract
  inputs: tracing is where a kernel refuses a shape, in its checks or its body)."""
  from pallas_kernels import ops

  op, kernel, args, kwargs, tiles = case
  kernels = KernelConfig("tpu", interpret=True)
  arrays = [a for a in args if isinstance(a, jax.ShapeDtypeStruct)]

  def with_arrays(fn):
    def call(*xs):
      it = iter(xs)
      return fn(*[next(it) if isinstance(a, jax.ShapeDtypeStruct) else a for a in args],
                **kwargs)
    return call

  said = []
  jax.eval_shape(with_arrays(lambda *a, **k: said.append(
      ops.supports(op, *a, kernels=kernels, **k))), *arrays)
  try:
    jax.eval_shape(with_arrays(functools.partial(kernel, interpret=RACES)), *arrays)
    accepted = True
  except Unsupported:
    accepted = False
  assert said == [accepted] == [tiles]


def test_traced_offset_takes_the_reference_on_tpu():
  """The window kernel compiles q_offset in: a traced one is not supported, so ops runs the
  reference (which takes it), while a static one runs the kernel."""
  from pallas_kernels import ops

  kernels = KernelConfig("tpu", interpret=True, detect_races=True)
  kq, kk, kv = fresh_keys(3)
  q = jax.random.normal(kq, (1, 128, 2, 128), jnp.float32)
  k = jax.random.normal(kk, (1, 256, 1, 128), jnp.float32)
  v = jax.random.normal(kv, (1, 256, 1, 128), jnp.float32)
  rule = dict(sinks=4, window=40)
  seen = []

  def traced(off):
    seen.append(ops.supports("window_attention", q, k, v, (0, 0), q_offset=off, **rule,
                             kernels=kernels))
    return ops.window_attention(q, k, v, (0, 0), q_offset=off, **rule, kernels=kernels)

  out, lse = jax.jit(traced)(jnp.int32(100))
  assert seen == [False]
  assert ops.supports("window_attention", q, k, v, (0, 0), q_offset=100, **rule,
                      kernels=kernels)
  want = ref.window_attention(q, k, v, (0, 0), q_offset=100, **rule)
  assert_attention(out, lse, *want, 1e-5)
  assert_attention(*ops.window_attention(q, k, v, (0, 0), q_offset=100, **rule,
                                         kernels=kernels), *want, 2e-5)


def test_bad_input_is_one_clear_error():
  q = jnp.zeros((1, 128, 2, 128))
  with pytest.raises(ValueError, match="kv_heads"):
    window_k.causal_attention(q, q, q, (0, 5))
  with pytest.raises(ValueError, match="block_mask"):
    decode_k.sparse_decode(q[:, 0], jnp.zeros((1, 2, 128, 128)), jnp.zeros((1, 2, 128, 128)),
                           (0, 1), jnp.zeros((1, 2, 3), bool), jnp.ones((1,), jnp.int32))
  with pytest.raises(Unsupported):
    topp_k.topp_select(jnp.zeros((1, 1, 24)), jnp.zeros((1, 1, 128, 24)),
                       jnp.ones((1,), jnp.int32), top_p=0.9)


# ---------------------------------------------------------------------------
# Sharded use: heads over a `tensor` axis of 8 CPU devices (own process: 8 devices).

_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, PartitionSpec as P
    from jax.experimental.pallas import tpu as pltpu
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    from pallas_kernels import reference as ref
    from pallas_kernels.tpu import sparse_decode as decode_k, window_attention as window_k

    assert jax.device_count() == 8
    races = pltpu.InterpretParams(detect_races=True)
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(AxisType.Auto,))
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print("seed", seed)
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    hq, hkv, d = 16, 8, 128
    kvh = tuple(h // 2 for h in range(hq))  # per shard: 2 query heads on 1 KV head
    heads4, heads3 = P(None, None, "tensor", None), P(None, None, "tensor")

    s = 256
    q, k, v = (jax.random.normal(ks[i], (1, s, n, d)) for i, n in enumerate((hq, hkv, hkv)))
    win = jax.shard_map(
        lambda q, k, v: window_k.window_attention(q, k, v, (0, 0), sinks=4, window=100,
                                                  block_q=128, block_k=128, interpret=races),
        mesh=mesh, in_specs=(heads4,) * 3, out_specs=(heads4, heads3), check_vma=False)
    out, lse = jax.block_until_ready(jax.jit(win)(q, k, v))
    assert not tpu_interpret.races.races_found
    want = ref.window_attention(q, k, v, kvh, sinks=4, window=100)
    np.testing.assert_allclose(out, want[0], atol=2e-5)
    np.testing.assert_allclose(lse, want[1], atol=2e-5)

    t = 256
    qd = jax.random.normal(ks[3], (2, hq, d))
    kc, vc = (jax.random.normal(ks[i], (2, hkv, t, d)) for i in (4, 5))
    mask = jax.random.bernoulli(ks[6], 0.5, (2, hq, t // 64)).at[:, :, 0].set(True)
    lengths = jnp.asarray([t, 130], jnp.int32)
    dec = jax.shard_map(
        lambda q, kc, vc, m, n: decode_k.sparse_decode(q, kc, vc, (0, 0), m, n,
                                                       blocks_per_step=2, interpret=races),
        mesh=mesh, in_specs=(P(None, "tensor", None), P(None, "tensor", None, None),
                             P(None, "tensor", None, None), P(None, "tensor", None), P()),
        out_specs=(P(None, "tensor", None), P(None, "tensor")), check_vma=False)
    out, lse = jax.block_until_ready(jax.jit(dec)(qd, kc, vc, mask, lengths))
    assert not tpu_interpret.races.races_found
    want = ref.sparse_decode(qd, kc, vc, kvh, mask, lengths)
    np.testing.assert_allclose(out, want[0], atol=2e-5)
    np.testing.assert_allclose(lse, want[1], atol=2e-5)
    print("SHARDED OK")
""")


def test_sharded_over_heads_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "SHARDED OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]
