"""GPU kernels (Pallas, Triton lowering) vs `pallas_kernels.reference`, on the CPU.

Every kernel runs in the Pallas interpreter (`interpret=True`) on small shapes and fresh
random inputs. The interpreter fills kernel outputs with NaN (floats) / INT_MIN (ints)
before the call (checked by `test_interpreter_poisons_outputs`), so an element a kernel
fails to write shows up as a NaN or a wrong index against the oracle.

The Mosaic GPU kernels (`*_mgpu.py`) run in the Mosaic GPU interpreter (a thread per
warpgroup, TMA, barriers). Its race detector is not used: in jax 0.11.2 it reports a race for
a plain SMEM read, an arrive on a barrier, a wait on it in another warpgroup and a TMA write
into that buffer, the ordering every slot ring relies on. The GPU-only path of those kernels
(what the interpreter does not run) is lowered for CUDA without a GPU
(`test_mgpu_lowers_for_cuda`).

`test_compiles_for_sm90` lowers each Triton kernel for an abstract NVIDIA H200 and compiles
it with the `triton` package to an sm_90 cubin, without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as pl_mgpu

from pallas_kernels import ops
from pallas_kernels import reference as ref
from pallas_kernels.config import KernelConfig
from pallas_kernels.gpu import compact
from pallas_kernels.gpu import cudnn_attention
from pallas_kernels.gpu import decode
from pallas_kernels.gpu import layer_decode as layer_decode_k
from pallas_kernels.gpu import prefill_select as prefill_select_k
from pallas_kernels.gpu import sparse_prefill as sparse_prefill_k
from pallas_kernels.gpu import topp_rows
from pallas_kernels.gpu import topp_select as topp_select_k
from pallas_kernels.gpu import window_attention as flash
from pallas_kernels.gpu import window_attention_mgpu as mgpu

KV_MIXED = (1, 0, 1, 1)  # 4 query heads on 2 KV heads, groups of unequal size
GPU = KernelConfig("gpu", interpret=True)  # the GPU backend in the Pallas interpreter
RNG = np.random.default_rng(0)  # reseeded per test from the `seed` fixture


@pytest.fixture(autouse=True)
def _seeded_rng(seed):
  global RNG
  RNG = np.random.default_rng(seed)


def _key():
  return jax.random.PRNGKey(int(RNG.integers(0, 2**31 - 1)))


def _normal(shape, dtype=jnp.float32, scale=1.0):
  return (jax.random.normal(_key(), shape, jnp.float32) * scale).astype(dtype)


def _close(got, want, tol):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape
  fin = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), fin)  # -inf LSE where no key is visible
  np.testing.assert_allclose(got[fin], want[fin], rtol=tol, atol=tol)


def test_interpreter_poisons_outputs():
  """The premise of the write checks: unwritten outputs come back as NaN / INT_MIN."""

  def kernel(o_ref, i_ref):
    o_ref[0] = 1.0
    i_ref[0] = 1

  o, i = pl.pallas_call(kernel, out_shape=[jax.ShapeDtypeStruct((4,), jnp.float32),
                                           jax.ShapeDtypeStruct((4,), jnp.int32)],
                        interpret=True)()
  assert o[0] == 1.0 and np.all(np.isnan(o[1:]))
  assert i[0] == 1 and np.all(np.asarray(i[1:]) == np.iinfo(np.int32).min)


# ---------------------------------------------------------------------------
# Prefill attention.


@pytest.mark.parametrize("b,sq,kv_len,q_offset,sinks,window", [
    (2, 200, 200, 0, 4, 50),    # S not a multiple of the tile, sinks outside the window
    (1, 100, 170, 70, 3, 64),   # a later chunk: queries at 70.., keys 0..169
    (1, 96, 96, 0, 4, 1000),    # window wider than the sequence = causal
])
def test_window_attention(b, sq, kv_len, q_offset, sinks, window):
  q = _normal((b, sq, 4, 32))
  k, v = _normal((b, kv_len, 2, 32)), _normal((b, kv_len, 2, 32))
  got = flash.window_attention(q, k, v, KV_MIXED, sinks=sinks, window=window,
                               q_offset=q_offset, block_q=32, block_k=16, interpret=True)
  want = flash.reference(q, k, v, KV_MIXED, sinks=sinks, window=window, q_offset=q_offset)
  _close(got[0], want[0], 2e-5)
  _close(got[1], want[1], 2e-5)


@pytest.mark.parametrize("sinks,window", [(3, 40), (0, 17)])
def test_window_attention_traced_offset(sinks, window):
  """One jitted function, q_offset a traced int32: offsets 0, off-tile, kv_len - q_len and
  one past it (queries beyond the last key) all match the reference; q_len 45 is not a
  multiple of the 16-query tile."""
  b, sq, kv_len = 2, 45, 130
  q = _normal((b, sq, 4, 32))
  k, v = _normal((b, kv_len, 2, 32)), _normal((b, kv_len, 2, 32))
  traces = []

  @jax.jit
  def run(q, k, v, off):
    traces.append(1)
    return flash.window_attention(q, k, v, KV_MIXED, sinks=sinks, window=window, q_offset=off,
                                  block_q=16, block_k=16, interpret=True)

  for off in (0, 23, kv_len - sq, kv_len - sq + 9):
    got = run(q, k, v, jnp.int32(off))
    want = flash.reference(q, k, v, KV_MIXED, sinks=sinks, window=window, q_offset=off)
    _close(got[0], want[0], 2e-5)
    _close(got[1], want[1], 2e-5)
  # The offset is data: four offsets, not four traces. (jit here retraces once after the
  # first interpreted run, independent of the offset's value.)
  assert len(traces) <= 2


def test_causal_attention_traced_offset():
  b, sq, kv_len = 2, 37, 100
  q = _normal((b, sq, 4, 32))
  k, v = _normal((b, kv_len, 2, 32)), _normal((b, kv_len, 2, 32))
  run = jax.jit(lambda q, k, v, off: flash.causal_attention(
      q, k, v, KV_MIXED, q_offset=off, block_q=16, block_k=32, interpret=True))
  for off in (0, 19, kv_len - sq):
    got = run(q, k, v, jnp.int32(off))
    want = flash.reference_causal(q, k, v, KV_MIXED, q_offset=off)
    _close(got[0], want[0], 2e-5)
    _close(got[1], want[1], 2e-5)
  with pytest.raises(ValueError, match="q_offset must be an integer scalar"):
    flash.causal_attention(q, k, v, KV_MIXED, q_offset=jnp.zeros((2,), jnp.int32),
                           interpret=True)


def test_dispatch_traced_offset_takes_pallas(monkeypatch):
  """cuDNN takes no offset: a traced q_offset must reach the Pallas kernel even where cuDNN
  is usable, and a static 0 still goes to cuDNN."""
  from pallas_kernels import ops
  from pallas_kernels.gpu import dispatch

  kernels = GPU.with_impls(window_attention="cudnn")
  monkeypatch.setattr(dispatch, "_cudnn_ok", lambda kernels: True)
  cudnn_calls = []
  monkeypatch.setattr(dispatch.cudnn, "causal_attention",
                      lambda *a, **k: cudnn_calls.append("causal") or ref.causal_attention(*a))
  monkeypatch.setattr(dispatch.cudnn, "window_attention",
                      lambda *a, **k: cudnn_calls.append("window") or ref.window_attention(
                          *a, sinks=k["sinks"], window=k["window"]))
  q = _normal((1, 40, 4, 32), jnp.bfloat16)
  k, v = _normal((1, 40, 2, 32), jnp.bfloat16), _normal((1, 40, 2, 32), jnp.bfloat16)
  causal = jax.jit(lambda off: ops.causal_attention(q, k, v, KV_MIXED, q_offset=off,
                                                    kernels=kernels))
  window = jax.jit(lambda off: ops.window_attention(q, k, v, KV_MIXED, sinks=2, window=9,
                                                    q_offset=off, kernels=kernels))
  for off in (0, 7):
    _close(causal(jnp.int32(off))[1],
           ref.causal_attention(q, k, v, KV_MIXED, q_offset=off)[1], 1e-4)
    _close(window(jnp.int32(off))[1],
           ref.window_attention(q, k, v, KV_MIXED, sinks=2, window=9, q_offset=off)[1], 1e-4)
  assert not cudnn_calls
  ops.causal_attention(q, k, v, KV_MIXED, q_offset=0, kernels=kernels)
  ops.window_attention(q, k, v, KV_MIXED, sinks=2, window=9, q_offset=0, kernels=kernels)
  assert cudnn_calls == ["causal", "window"]


def test_engine_chunked_prefill_on_gpu_kernels(monkeypatch):
  """The engine's jitted chunked prefill (p0 traced) through the Pallas prefill kernels in
  the interpreter == the same model rebuilt on the reference backend, in one process without
  clearing jit caches (the kernel config is part of the model's graph definition). rtpurbo
  mode: retrieval heads run dense causal in prefill, local heads sharing their KV head the
  window kernel."""
  from flax import nnx
  from pallas_kernels.gpu import dispatch
  from rtpurbo_jax import convert
  from rtpurbo_jax.attention.plan import HeadPlan
  from rtpurbo_jax.config import ModelConfig, SparseConfig
  from rtpurbo_jax.infer.engine import Engine
  from rtpurbo_jax.models.transformer import Transformer

  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16)
  plan = HeadPlan.from_mask([[1, 0, 0, 0], [0, 0, 0, 1]], 2)
  seed = int(RNG.integers(0, 2**31 - 1))

  model = Transformer(cfg, sparse=SparseConfig(
      mode="rtpurbo", window=8, sinks=2, seqlen_threshold=0, block_size=8, indexer_dim=8,
      top_p=0.6, chunk_size=16), plan=plan, rngs=nnx.Rngs(seed), init_std=0.3,
      kernels=KernelConfig("reference"))

  def generate(kernels):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 30)).astype(np.int32)
    return Engine(convert.rebuild(model, kernels=kernels)).generate(
        ids, 2, prompt_lengths=np.asarray([30, 17]), prefill_chunk=11)

  calls = []
  for op in ("causal_attention", "window_attention"):
    real = getattr(flash, op)

    def counted(*a, _op=op, _real=real, **k):
      out = _real(*a, **k)
      calls.append(_op)  # only once the kernel took the (traced) offset
      return out

    monkeypatch.setattr(dispatch.flash_k, op, counted)
  want = generate(KernelConfig("reference"))
  assert not calls
  got = generate(GPU)
  assert {"causal_attention", "window_attention"} <= set(calls)
  np.testing.assert_allclose(got.first_logits, want.first_logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("b,sq,kv_len,q_offset,sinks,window,tiles,d,dtype,interp", [
    # ragged q and kv, sinks below the window, 3 slots
    (1, 300, 300, 0, 4, 100, mgpu.Tiles(64, 64, 3), 64, jnp.bfloat16, True),
    # the same without the warpgroups taking turns
    (1, 300, 300, 0, 4, 100, mgpu.Tiles(64, 64, 3, pingpong=False), 64, jnp.bfloat16,
     pl_mgpu.InterpretGPUParams()),
    # a later chunk at a static offset: queries at 72.., keys 0..199, more steps than slots
    (2, 128, 200, 72, 3, 64, mgpu.Tiles(64, 64, 2), 64, jnp.bfloat16, True),
    # the default tiles (128-key steps), head_dim 128, fp16, a window wider than the sequence
    (1, 200, 200, 0, 4, 1000, mgpu.Tiles(), 128, jnp.float16, True),
    # no sinks: a row's first blocks may all be hidden (the finite-mask path)
    (1, 256, 256, 0, 0, 70, mgpu.Tiles(64, 64, 2), 64, jnp.bfloat16, True),
    # causal over a longer key range
    (1, 160, 230, 70, 0, None, mgpu.Tiles(64, 64, 2), 64, jnp.bfloat16, True),
])
def test_window_attention_mgpu(b, sq, kv_len, q_offset, sinks, window, tiles, d, dtype, interp):
  """The Mosaic GPU kernel against the reference, every row and the LSE; outputs start as NaN
  in the interpreter, so a row it fails to write fails here."""
  q = _normal((b, sq, 4, d), dtype)
  k, v = _normal((b, kv_len, 2, d), dtype), _normal((b, kv_len, 2, d), dtype)
  if window is None:
    got = mgpu.causal_attention(q, k, v, KV_MIXED, q_offset=q_offset, tiles=tiles,
                                interpret=interp)
    want = mgpu.reference_causal(q, k, v, KV_MIXED, q_offset=q_offset)
  else:
    got = mgpu.window_attention(q, k, v, KV_MIXED, sinks=sinks, window=window,
                                q_offset=q_offset, tiles=tiles, interpret=interp)
    want = mgpu.reference(q, k, v, KV_MIXED, sinks=sinks, window=window, q_offset=q_offset)
  assert got[0].dtype == dtype and got[1].shape == (b, sq, 4)
  _close(got[0], want[0], 2e-2)
  _close(got[1], want[1], 1e-4)


def test_mgpu_runtime_offset():
  """One compiled Mosaic GPU kernel per shape serves every chunk offset (a traced scalar):
  the window rule at offsets where some rows see no key (zeros, lse -inf, as the reference).
  The KV-cache layout (`cache_causal_attention`) is lowered for CUDA below and checked at full
  size on the GPU (`benchmarks/check_prefill.py --checks=cache_attn`): in the interpreter it
  hung once under the two-worker suite (a cache case, never alone), so it is not run here."""
  tiles = mgpu.Tiles(64, 64, 2)
  q = _normal((1, 150, 4, 64), jnp.bfloat16)
  k, v = _normal((1, 200, 2, 64), jnp.bfloat16), _normal((1, 200, 2, 64), jnp.bfloat16)
  window = jax.jit(lambda off: mgpu.window_attention(q, k, v, KV_MIXED, sinks=0, window=60,
                                                     q_offset=off, tiles=tiles,
                                                     interpret=True))
  for off in (13, 120):  # 120: rows from position 260 on see none of the 200 keys
    want = mgpu.reference(q, k, v, KV_MIXED, sinks=0, window=60, q_offset=off)
    assert (off == 120) == bool(np.any(np.isinf(np.asarray(want[1]))))
    got = window(jnp.int32(off))
    _close(got[0], want[0], 2e-2)
    _close(got[1], want[1], 1e-4)


@pytest.mark.parametrize("window,tiles,d", [(100, mgpu.Tiles(), 128),
                                             (None, mgpu.Tiles(64, 64, 4, pingpong=False), 64)])
def test_mgpu_lowers_for_cuda(window, tiles, d):
  """The GPU path (wgmma with P from registers, run_state; what the interpreter does not run)
  goes through the Mosaic GPU lowering without a GPU: a cross-platform lowering for CUDA
  embeds the kernel's Mosaic GPU module."""
  q = jax.ShapeDtypeStruct((1, 300, 4, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 300, 2, d), jnp.bfloat16)
  if window is None:
    fn = lambda q, k, v: mgpu.causal_attention(q, k, v, KV_MIXED, tiles=tiles)  # noqa: E731
  else:
    fn = lambda q, k, v: mgpu.window_attention(q, k, v, KV_MIXED, sinks=4,  # noqa: E731
                                               window=window, tiles=tiles)
  text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_mgpu_cache_layout_lowers_for_cuda():
  """The KV cache read in place ([batch, kv, T, d]) at a traced chunk offset lowers for CUDA."""
  q = jax.ShapeDtypeStruct((1, 300, 4, 128), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((1, 2, 1024, 128), jnp.bfloat16)
  fn = lambda q, k, v, off: mgpu.cache_causal_attention(q, k, v, KV_MIXED,  # noqa: E731
                                                       q_offset=off)
  text = jax.jit(fn).trace(q, cache, cache, jax.ShapeDtypeStruct((), jnp.int32)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_mgpu_key_schedule_covers_exactly_the_visible_blocks():
  """key_schedule's blocks are the blocks holding a key some query of the tile sees (brute
  force over tiles, offsets, sinks and windows)."""
  for bk, sinks, window, kv_len, first, rows in [(64, 4, 100, 1000, 640, 128),
                                                 (64, 0, 64, 700, 128, 128),
                                                 (128, 130, 300, 2000, 1024, 128),
                                                 (64, 4, None, 500, 256, 128),
                                                 (64, 4, 5000, 900, 384, 128)]:
    last = first + rows - 1
    n_sink, lo, hi = (int(x) for x in mgpu.key_schedule(first, last, bk=bk, sinks=sinks,
                                                        window=window, kv_len=kv_len))
    got = list(range(n_sink)) + list(range(lo, hi))
    want = sorted({j // bk for t in range(first, last + 1) for j in range(min(t + 1, kv_len))
                   if window is None or j < sinks or j > t - window})
    assert got == want, (bk, sinks, window, first)


def test_causal_attention_bf16():
  q = _normal((2, 130, 4, 64), jnp.bfloat16)
  k, v = _normal((2, 130, 2, 64), jnp.bfloat16), _normal((2, 130, 2, 64), jnp.bfloat16)
  out, lse = flash.causal_attention(q, k, v, KV_MIXED, block_q=64, block_k=32, interpret=True)
  want_out, want_lse = flash.reference_causal(q, k, v, KV_MIXED)
  assert out.dtype == jnp.bfloat16
  _close(out, want_out, 2e-2)
  _close(lse, want_lse, 1e-4)


@pytest.mark.parametrize("chunked", [False, True])
def test_cudnn_path_logic(chunked, monkeypatch):
  """GQA regrouping, sink merge and window chunking of the cuDNN path, with XLA attention
  standing in for cuDNN (same calls, same LSE contract)."""
  monkeypatch.setattr(cudnn_attention, "IMPLEMENTATION", "xla")
  q = _normal((2, 300, 4, 16))
  k, v = _normal((2, 300, 2, 16)), _normal((2, 300, 2, 16))
  got = cudnn_attention.window_attention(q, k, v, KV_MIXED, sinks=4, window=64, chunked=chunked)
  want = ref.window_attention(q, k, v, KV_MIXED, sinks=4, window=64)
  _close(got[0], want[0], 2e-5)
  _close(got[1], want[1], 2e-5)
  got = cudnn_attention.causal_attention(q, k, v, KV_MIXED)
  want = ref.causal_attention(q, k, v, KV_MIXED)
  _close(got[0], want[0], 2e-5)
  _close(got[1], want[1], 2e-5)


# ---------------------------------------------------------------------------
# Block lists and top-p.


def test_compact_rows():
  mask = jax.random.bernoulli(_key(), 0.3, (3, 4, 100))
  mask = mask.at[0, 0].set(False).at[0, 1].set(True)  # empty and full rows
  lists, counts = compact.compact_rows(mask, interpret=True)
  want_lists, want_counts = compact.reference(mask)
  np.testing.assert_array_equal(lists, want_lists)
  np.testing.assert_array_equal(counts, want_counts)


def _ambiguous_blocks(lm, n_valid, p, cut=1e-5):
  """float64 oracle of exact top-p: blocks whose prefix mass lies within `cut` of p
  (float32 summation order may put them either side)."""
  lm = np.asarray(lm, np.float64)
  amb = np.zeros(lm.shape, bool)
  for r in range(lm.shape[0]):
    nv = int(n_valid[r])
    if nv == 0:
      continue
    x = lm[r, :nv]
    m = np.exp(x - x.max())
    m /= m.sum()
    order = sorted(range(nv), key=lambda j: (-m[j], j))
    before = np.cumsum(m[order]) - m[order]
    amb[r, np.asarray(order)] = np.abs(before - p) < cut
  return amb


@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
def test_topp_rows(top_p):
  rows, n = 24, 150
  lm = _normal((rows, n), scale=3.0)
  lm = lm.at[:, 7].set(lm[:, 8])  # exact ties: lower index first
  n_valid = jax.random.randint(_key(), (rows,), 0, n + 1).at[0].set(0).at[1].set(n)
  own = jnp.maximum(n_valid - 1, 0) // 2
  exact = topp_rows.select_rows(lm, n_valid, own, top_p=top_p, interpret=True)
  want = topp_rows.reference(lm, n_valid, own, top_p=top_p)
  amb = _ambiguous_blocks(lm, n_valid, top_p)
  diff = np.asarray(exact != want)
  assert not np.any(diff & ~amb), np.argwhere(diff & ~amb)
  hist = topp_rows.select_rows(lm, n_valid, own, top_p=top_p, selector="histogram",
                               interpret=True)
  want_hist = topp_rows.reference(lm, n_valid, own, top_p=top_p, selector="histogram")
  np.testing.assert_array_equal(hist, want_hist)
  assert not np.any(np.asarray(want & ~hist & ~amb))  # superset of the exact set
  valid = np.arange(n)[None, :] < np.asarray(n_valid)[:, None]
  assert not np.any(np.asarray(exact) & ~valid)
  # The three-threshold search ends at the same threshold as bisection: the same blocks,
  # ambiguous ones included; so does a one-warp program.
  quad = topp_rows.select_rows(lm, n_valid, own, top_p=top_p, search="quad", num_warps=1,
                               interpret=True)
  np.testing.assert_array_equal(quad, exact)


def test_topp_rows_quad_search_on_ties_and_decode_rows():
  """Masses with many exact ties (a few distinct log-masses) and the decode form: the
  three-threshold search keeps exactly the blocks bisection keeps; bad options are refused."""
  b, h, n = 2, 3, 300
  lm = jax.random.randint(_key(), (b, h, n), 0, 4).astype(jnp.float32)
  lengths = jnp.asarray([300 * 64, 77 * 64 + 5], jnp.int32)  # 300 and 78 valid blocks
  for top_p in (0.3, 0.9):
    want = topp_rows.select_rows_decode(lm, lengths, block_size=64, top_p=top_p,
                                        interpret=True)
    got = topp_rows.select_rows_decode(lm, lengths, block_size=64, top_p=top_p,
                                       search="quad", interpret=True)
    np.testing.assert_array_equal(got, want)
    n_valid = jnp.repeat(-(-lengths // 64), h)
    ref_keep = topp_rows.reference(lm.reshape(-1, n), n_valid,
                                   jnp.repeat((lengths - 1) // 64, h), top_p=top_p)
    diff = np.asarray(got.reshape(-1, n) != ref_keep)
    assert not np.any(diff & ~_ambiguous_blocks(lm.reshape(-1, n), n_valid, top_p))
  with pytest.raises(ValueError, match="search"):
    topp_rows.select_rows_decode(lm, lengths, block_size=64, top_p=0.9, search="ternary")
  with pytest.raises(ValueError, match="num_warps"):
    topp_rows.select_rows_decode(lm, lengths, block_size=64, top_p=0.9, num_warps=3)


@pytest.mark.parametrize("selector", ["exact", "histogram"])
def test_topp_select_decode(selector):
  b, h, t, r = 3, 2, 512, 16
  qi = _normal((b, h, r), scale=2.0)
  ck = _normal((b, h, t, r))
  lengths = jnp.asarray([512, 77, 1], jnp.int32)  # full, ragged, a single key
  for top_p in (0.8, 1.0):
    got = topp_select_k.topp_select(qi, ck, lengths, top_p=top_p, selector=selector,
                                    interpret=True)
    want = topp_select_k.reference(qi, ck, lengths, top_p=top_p, selector=selector)
    np.testing.assert_array_equal(got, want)
  assert bool(jnp.all(got == (jnp.arange(t // 64)[None, None] < (lengths[:, None, None] + 63)
                              // 64)))  # p = 1: every block with a key


def test_topp_select_decode_with_block_offset():
  """The distance bias as a per-block offset: the kernel path equals the reference with the
  same offset, and the offset changes the selection (the control)."""
  b, h, t, r = 2, 3, 512, 16
  qi = _normal((b, h, r), scale=1.0)
  ck = _normal((b, h, t, r))
  lengths = jnp.asarray([512, 200], jnp.int32)
  offset = _normal((b, h, t // 64), scale=2.0)
  got = topp_select_k.topp_select(qi, ck, lengths, top_p=0.7, block_offset=offset,
                                  interpret=True)
  want = topp_select_k.reference(qi, ck, lengths, top_p=0.7, block_offset=offset)
  np.testing.assert_array_equal(got, want)
  assert bool(jnp.any(got != topp_select_k.reference(qi, ck, lengths, top_p=0.7)))
  # The dispatch hands the offset to the kernel.
  assert ops.supports("topp_select", qi, ck, lengths, top_p=0.7, block_offset=offset,
                      kernels=GPU)
  np.testing.assert_array_equal(
      ops.topp_select(qi, ck, lengths, top_p=0.7, block_offset=offset, kernels=GPU), want)


def test_prefill_select():
  b, s, h, r = 2, 320, 2, 8  # r < 16: padded inside
  qi, ki = _normal((b, s, h, r), scale=1.5), _normal((b, s, h, r))
  for top_p in (0.6, 1.0):
    got = prefill_select_k.prefill_select(qi, ki, top_p=top_p, interpret=True)
    want = prefill_select_k.reference(qi, ki, top_p=top_p)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("r", [8, 16])
def test_cache_prefill_select(r):
  """A chunk at a block offset over the compressed-key cache: ragged rows (one ends inside
  the chunk, one before it), r < 16 padded inside, a traced offset under jit."""
  b, h, s, t, bs = 3, 2, 128, 640, 64
  qi, ck = _normal((b, s, h, r), scale=1.5), _normal((b, h, t, r))
  run = jax.jit(lambda qi, ck, n, off, p: prefill_select_k.cache_prefill_select(
      qi, ck, n, q_offset=off, top_p=p, interpret=True), static_argnums=4)
  for off in (0, 3 * bs, t - s):
    lengths = jnp.asarray([off + s, off + 70, 5], jnp.int32)
    for top_p in (0.6, 0.9, 1.0):
      got = run(qi, ck, lengths, jnp.int32(off), top_p)
      want = prefill_select_k.reference_cache(qi, ck, lengths, q_offset=off, top_p=top_p)
      assert got.shape == (b, h, s // bs, t // bs)
      np.testing.assert_array_equal(got, want)
      g = off // bs + jnp.arange(s // bs)
      assert not np.any(np.asarray(got) & (jnp.arange(t // bs) > g[:, None])[None, None])
  # The whole-sequence selection is the chunked one at offset 0.
  qs, ks = _normal((b, t, h, r), scale=1.5), _normal((b, t, h, r))
  np.testing.assert_array_equal(
      prefill_select_k.prefill_select(qs, ks, top_p=0.7, interpret=True),
      ref.prefill_select(qs, ks, top_p=0.7))


# ---------------------------------------------------------------------------
# Sparse attention.


def _masks(b, h, nb):
  causal = jnp.tril(jnp.ones((nb, nb), bool))
  rand = jax.random.bernoulli(_key(), 0.4, (b, h, nb, nb)) | jnp.eye(nb, dtype=bool)
  return {"everything": jnp.broadcast_to(causal, (b, h, nb, nb)),
          "own_block": jnp.broadcast_to(jnp.eye(nb, dtype=bool), (b, h, nb, nb)),
          "random": rand & causal}


@pytest.mark.parametrize("which", ["everything", "own_block", "random"])
def test_sparse_prefill(which):
  b, s, d = 2, 256, 32
  q = _normal((b, s, 4, d))
  k, v = _normal((b, s, 2, d)), _normal((b, s, 2, d))
  mask = _masks(b, 4, s // 64)[which]
  got = sparse_prefill_k.sparse_prefill(q, k, v, KV_MIXED, mask, interpret=True)
  want = sparse_prefill_k.reference(q, k, v, KV_MIXED, mask)
  _close(got[0], want[0], 2e-5)
  _close(got[1], want[1], 2e-5)
  if which == "everything":  # selecting every causal block is dense causal attention
    dense = ref.causal_attention(q, k, v, KV_MIXED)
    _close(got[0], dense[0], 2e-5)


@pytest.mark.parametrize("which", ["everything", "own_block", "random", "none"])
def test_cache_sparse_prefill(which):
  """A chunk at block offsets over a KV cache in its own layout, traced offset, GQA groups
  of unequal size; selecting every causal block equals dense causal cache attention."""
  b, s, t, d, bs = 2, 128, 512, 32, 64
  nq, nk = s // bs, t // bs
  q = _normal((b, s, 4, d))
  kc, vc = _normal((b, 2, t, d)), _normal((b, 2, t, d))
  run = jax.jit(lambda q, kc, vc, m, off: sparse_prefill_k.cache_sparse_prefill(
      q, kc, vc, KV_MIXED, m, q_offset=off, interpret=True))
  for off in (0, 2 * bs, t - s):
    g = off // bs + jnp.arange(nq)
    causal = jnp.arange(nk)[None, :] <= g[:, None]  # [nq, nk]
    own = jnp.arange(nk)[None, :] == g[:, None]
    rand = jax.random.bernoulli(_key(), 0.4, (b, 4, nq, nk))
    mask = {"everything": causal, "own_block": own, "random": (rand | own) & causal,
            "none": jnp.zeros((nq, nk), bool)}[which]
    mask = jnp.broadcast_to(mask, (b, 4, nq, nk))
    got = run(q, kc, vc, mask, jnp.int32(off))
    want = sparse_prefill_k.reference_cache(q, kc, vc, KV_MIXED, mask, q_offset=off)
    _close(got[0], want[0], 2e-5)
    _close(got[1], want[1], 2e-5)
    if which == "everything":
      dense = ref.cache_causal_attention(q, kc, vc, KV_MIXED, q_offset=off)
      _close(got[0], dense[0], 2e-5)
    if which == "none":
      assert np.all(np.isneginf(np.asarray(got[1])))


@pytest.mark.parametrize("kv_heads", [(0, 1, 2), (1, 0, 1, 1)])
def test_sparse_decode(kv_heads):
  """Singleton groups and a GQA group whose heads select different blocks."""
  b, t, d = 2, 320, 32
  hq, hk = len(kv_heads), max(kv_heads) + 1
  q = _normal((b, hq, d))
  kc, vc = _normal((b, hk, t, d)), _normal((b, hk, t, d))
  lengths = jnp.asarray([320, 130], jnp.int32)  # ragged, not multiples of 64
  nb = t // 64
  own = jax.nn.one_hot((lengths - 1) // 64, nb, dtype=bool)[:, None]
  causal = jnp.arange(nb)[None, None] <= ((lengths - 1) // 64)[:, None, None]
  masks = {"random": jax.random.bernoulli(_key(), 0.5, (b, hq, nb)) & causal | own,
           "everything": jnp.broadcast_to(causal, (b, hq, nb)),
           "own_block": jnp.broadcast_to(own, (b, hq, nb))}
  if len(set(kv_heads)) == len(kv_heads):
    masks = {"random": masks["random"]}
  for name, mask in masks.items():
    got = decode.sparse_decode(q, kc, vc, kv_heads, mask, lengths, interpret=True)
    want = decode.reference(q, kc, vc, kv_heads, mask, lengths)
    _close(got[0], want[0], 2e-5)
    _close(got[1], want[1], 2e-5)
    if name == "everything":
      dense = ref.masked_attention(q[:, None], jnp.swapaxes(kc, 1, 2), jnp.swapaxes(vc, 1, 2),
                                   (lengths - 1)[:, None],
                                   jnp.broadcast_to(jnp.arange(t), (b, t)), kv_heads)
      _close(got[0], dense[0][:, 0], 2e-5)


def _ring_positions(q_pos, capacity, sinks):
  ring = capacity - sinks
  pos = np.full((capacity,), -1, np.int32)
  p = np.arange(max(sinks, q_pos + 1 - ring), q_pos + 1)
  pos[sinks + (p - sinks) % ring] = p
  pos[:min(sinks, q_pos + 1)] = np.arange(min(sinks, q_pos + 1))
  return pos


def test_ring_decode():
  """A wrapped ring (capacity not a multiple of 64), a young ring, dense fallback."""
  b, c, d, sinks, window = 3, 200, 32, 4, 90
  q = _normal((b, 4, d))
  rk, rv = _normal((b, 2, c, d)), _normal((b, 2, c, d))
  q_pos = jnp.asarray([450, 120, 150], jnp.int32)
  ring_pos = jnp.asarray(np.stack([_ring_positions(int(p), c, sinks) for p in q_pos]))
  active = jnp.asarray([True, True, False])
  got = decode.ring_decode(q, rk, rv, ring_pos, KV_MIXED, q_pos, sinks=sinks, window=window,
                           sparse_active=active, interpret=True)
  want = decode.reference_ring(q, rk, rv, ring_pos, KV_MIXED, q_pos, sinks=sinks,
                               window=window, sparse_active=active)
  _close(got[0], want[0], 2e-5)
  _close(got[1], want[1], 2e-5)


def test_ring_decode_full_cache():
  """Local heads reading the full cache: positions arange, only the window is visited."""
  b, t, d = 2, 448, 32
  q = _normal((b, 4, d))
  kc, vc = _normal((b, 2, t, d)), _normal((b, 2, t, d))
  lengths = jnp.asarray([448, 300], jnp.int32)
  pos = jnp.where(jnp.arange(t)[None] < lengths[:, None], jnp.arange(t)[None], -1)
  got = decode.ring_decode(q, kc, vc, pos, KV_MIXED, lengths - 1, sinks=4, window=128,
                           interpret=True)
  want = decode.reference_ring(q, kc, vc, pos, KV_MIXED, lengths - 1, sinks=4, window=128)
  _close(got[0], want[0], 2e-5)
  _close(got[1], want[1], 2e-5)


# 10 query heads of one layer in all four sets: ring heads on ring KV 1 (a GQA pair), local
# heads on full KV 0 and 2, a dense head, selected heads on full KV 0, 1 and 2 (a pair on 2):
# full KV 0 and 2 serve local and selected heads at once.
LAYER_HEADS = ref.DecodeHeads.of(ring=((0, 5), (1, 1)), local=((1, 6, 9), (0, 2, 2)),
                                 dense=((2,), (1,)), selected=((3, 4, 7, 8), (0, 2, 2, 1)))


@pytest.mark.parametrize("which", ["random", "everything", "own_block"])
def test_layer_decode(which):
  """Every head of a layer in one kernel == the per-set references: a wrapped ring (capacity
  not a multiple of 64), a young one, a row below the sparse threshold, ragged lengths.
  Selecting every causal block equals the dense set's rule; the own block alone, that
  block's keys only."""
  b, d, t, c, sinks, window = 3, 32, 448, 200, 4, 90
  q = _normal((b, 10, d))
  rk, rv = _normal((b, 2, c, d)), _normal((b, 2, c, d))
  fk, fv = _normal((b, 3, t, d)), _normal((b, 3, t, d))
  lengths = jnp.asarray([448, 130, 300], jnp.int32)
  q_pos = lengths - 1
  ring_pos = jnp.asarray(np.stack([_ring_positions(int(p), c, sinks) for p in q_pos]))
  active = jnp.asarray([True, True, False])
  nb = t // 64
  causal = jnp.arange(nb)[None, None] <= (q_pos // 64)[:, None, None]
  own = jax.nn.one_hot(q_pos // 64, nb, dtype=bool)[:, None]
  mask = {"random": jax.random.bernoulli(_key(), 0.5, (b, 4, nb)) & causal | own,
          "everything": jnp.broadcast_to(causal, (b, 4, nb)),
          "own_block": jnp.broadcast_to(own, (b, 4, nb))}[which]
  args = (q, rk, rv, ring_pos, fk, fv, lengths, q_pos, mask)
  rule = dict(heads=LAYER_HEADS, sinks=sinks, window=window, sparse_active=active)
  got = layer_decode_k.layer_decode(*args, **rule, interpret=True)
  want = ref.layer_decode(*args, **rule)
  _close(got[0], want[0], 2e-5)
  _close(got[1], want[1], 2e-5)
  sel = jnp.asarray(LAYER_HEADS.selected[0])
  if which == "everything":  # the selected heads read as dense heads do
    as_dense = ref.DecodeHeads.of(ring=LAYER_HEADS.ring, local=LAYER_HEADS.local,
                                  dense=tuple(a + b for a, b in zip(LAYER_HEADS.dense,
                                                                    LAYER_HEADS.selected)))
    dense = layer_decode_k.layer_decode(*args[:-1], None, heads=as_dense, sinks=sinks,
                                        window=window, sparse_active=active, interpret=True)
    _close(got[0][:, sel], dense[0][:, sel], 2e-5)
  if which == "own_block":
    k0 = (q_pos // 64) * 64
    key_pos = jnp.arange(t)[None]
    only = jnp.where((key_pos >= k0[:, None]) & (key_pos < lengths[:, None]), key_pos, -1)
    want_own = ref.masked_attention(q[:, None][:, :, sel], jnp.swapaxes(fk, 1, 2),
                                    jnp.swapaxes(fv, 1, 2), q_pos[:, None], only,
                                    LAYER_HEADS.selected[1])
    _close(got[0][:, sel], want_own[0][:, 0], 2e-5)


def test_layer_decode_single_sets_and_errors():
  """A layer of ring heads alone and of dense heads alone (the other caches absent); sets
  that do not partition the heads are refused by the op and by the dispatch."""
  b, d, c, t = 2, 32, 128, 192
  q = _normal((b, 4, d))
  rk, rv = _normal((b, 2, c, d)), _normal((b, 2, c, d))
  fk, fv = _normal((b, 2, t, d)), _normal((b, 2, t, d))
  lengths = jnp.asarray([192, 70], jnp.int32)
  q_pos = lengths - 1
  ring_pos = jnp.asarray(np.stack([_ring_positions(int(p), c, 2) for p in q_pos]))
  ring_only = ref.DecodeHeads.of(ring=((0, 1, 2, 3), KV_MIXED))
  dense_only = ref.DecodeHeads.of(dense=((0, 1, 2, 3), KV_MIXED))
  for heads, caches in ((ring_only, (rk, rv, ring_pos, None, None)),
                        (dense_only, (None, None, None, fk, fv))):
    args = (q, *caches, lengths, q_pos, None)
    got = layer_decode_k.layer_decode(*args, heads=heads, sinks=2, window=40, interpret=True)
    want = ref.layer_decode(*args, heads=heads, sinks=2, window=40)
    _close(got[0], want[0], 2e-5)
    _close(got[1], want[1], 2e-5)
  gap = ref.DecodeHeads.of(ring=((0, 1, 2), (1, 0, 1)))
  with pytest.raises(ValueError, match="partition"):
    ref.layer_decode(q, rk, rv, ring_pos, None, None, lengths, q_pos, None, heads=gap,
                     sinks=2, window=40)
  with pytest.raises(ValueError, match="ring heads need"):
    ref.layer_decode(q, None, None, None, fk, fv, lengths, q_pos, None, heads=ring_only,
                     sinks=2, window=40)
  from pallas_kernels import ops
  assert not ops.supports("layer_decode", q, rk, rv, ring_pos, None, None, lengths, q_pos,
                          None, heads=gap, sinks=2, window=40, kernels=GPU)
  assert ops.supports("layer_decode", q, rk, rv, ring_pos, None, None, lengths, q_pos, None,
                      heads=ring_only, sinks=2, window=40, kernels=GPU)


# ---------------------------------------------------------------------------
# Dispatch through pallas_kernels.ops.


def test_ops_routes_to_gpu_kernels(monkeypatch):
  from pallas_kernels import ops
  from pallas_kernels.gpu import dispatch

  calls = []
  real = flash.window_attention
  monkeypatch.setattr(dispatch.flash_k, "window_attention",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  q = _normal((1, 96, 4, 32))
  k, v = _normal((1, 96, 2, 32)), _normal((1, 96, 2, 32))
  assert ops.supports("window_attention", q, k, v, KV_MIXED, sinks=4, window=40, kernels=GPU)
  got = ops.window_attention(q, k, v, KV_MIXED, sinks=4, window=40, kernels=GPU)
  assert calls, "ops.window_attention did not reach the GPU kernel"
  _close(got[0], ref.window_attention(q, k, v, KV_MIXED, sinks=4, window=40)[0], 2e-5)
  # A head_dim the kernels do not take (not a power of two): the reference runs.
  q3, k3, v3 = _normal((1, 64, 4, 24)), _normal((1, 64, 2, 24)), _normal((1, 64, 2, 24))
  assert dispatch.window_attention(q3, k3, v3, KV_MIXED, sinks=4, window=40,
                                   kernels=GPU) is None
  assert not ops.supports("window_attention", q3, k3, v3, KV_MIXED, sinks=4, window=40,
                          kernels=GPU)
  calls.clear()
  _close(ops.window_attention(q3, k3, v3, KV_MIXED, sinks=4, window=40, kernels=GPU)[0],
         ref.window_attention(q3, k3, v3, KV_MIXED, sinks=4, window=40)[0], 1e-6)
  assert not calls


# ---------------------------------------------------------------------------
# Compile for sm_90 without a GPU.

S = jax.ShapeDtypeStruct
BF = jnp.bfloat16

COMPILE_CASES = {
    "window_attention": (
        lambda q, k, v: flash.window_attention(q, k, v, (0, 0, 1, 1), sinks=4, window=512,
                                               interpret=False),
        (S((1, 2048, 4, 128), BF), S((1, 2048, 2, 128), BF), S((1, 2048, 2, 128), BF))),
    "window_attention_traced_offset": (
        lambda q, k, v, off: flash.window_attention(q, k, v, (0, 1, 1, 1), sinks=4, window=512,
                                                    q_offset=off, interpret=False),
        (S((1, 1000, 4, 128), BF), S((1, 1511, 2, 128), BF), S((1, 1511, 2, 128), BF),
         S((), jnp.int32))),
    "causal_attention_traced_offset": (
        lambda q, k, v, off: flash.causal_attention(q, k, v, (0, 0, 1, 1), q_offset=off,
                                                    interpret=False),
        (S((1, 1000, 4, 128), BF), S((1, 3000, 2, 128), BF), S((1, 3000, 2, 128), BF),
         S((), jnp.int32))),
    "sparse_prefill": (
        lambda q, k, v, m: sparse_prefill_k.sparse_prefill(q, k, v, (0, 1), m, interpret=False),
        (S((1, 2048, 2, 128), BF), S((1, 2048, 2, 128), BF), S((1, 2048, 2, 128), BF),
         S((1, 2, 32, 32), jnp.bool_))),
    "cache_sparse_prefill": (
        lambda q, k, v, m, off: sparse_prefill_k.cache_sparse_prefill(
            q, k, v, (0, 0, 1), m, q_offset=off, interpret=False),
        (S((1, 1024, 3, 128), BF), S((1, 2, 8192, 128), BF), S((1, 2, 8192, 128), BF),
         S((1, 3, 16, 128), jnp.bool_), S((), jnp.int32))),
    "cache_prefill_select": (
        lambda a, c, n, off: prefill_select_k.cache_prefill_select(
            a, c, n, q_offset=off, top_p=0.9, interpret=False),
        (S((1, 1024, 2, 16), BF), S((1, 2, 8192, 16), BF), S((1,), jnp.int32),
         S((), jnp.int32))),
    "prefill_select": (
        lambda a, c: prefill_select_k.prefill_select(a, c, top_p=0.9, interpret=False),
        (S((1, 4096, 2, 16), jnp.float32), S((1, 4096, 2, 16), jnp.float32))),
    "topp_select": (
        lambda a, c, n: topp_select_k.topp_select(a, c, n, top_p=0.9, selector="histogram",
                                                  interpret=False),
        (S((1, 2, 16), jnp.float32), S((1, 2, 8192, 16), BF), S((1,), jnp.int32))),
    "topp_rows_quad_one_warp": (
        lambda lm, n: topp_rows.select_rows_decode(lm, n, block_size=64, top_p=0.9,
                                                   search="quad", num_warps=1,
                                                   interpret=False),
        (S((1, 5, 2048), jnp.float32), S((1,), jnp.int32))),
    "sparse_decode": (
        lambda q, k, v, m, n: decode.sparse_decode(q, k, v, (0, 0, 1), m, n, interpret=False),
        (S((2, 3, 128), BF), S((2, 2, 4096, 128), BF), S((2, 2, 4096, 128), BF),
         S((2, 3, 64), jnp.bool_), S((2,), jnp.int32))),
    "layer_decode": (
        lambda q, rk, rv, rp, fk, fv, n, qp, m: layer_decode_k.layer_decode(
            q, rk, rv, rp, fk, fv, n, qp, m, heads=LAYER_HEADS, sinks=4, window=1024,
            interpret=False),
        (S((2, 10, 128), BF), S((2, 2, 2000, 128), BF), S((2, 2, 2000, 128), BF),
         S((2, 2000), jnp.int32), S((2, 3, 4096, 128), BF), S((2, 3, 4096, 128), BF),
         S((2,), jnp.int32), S((2,), jnp.int32), S((2, 4, 64), jnp.bool_))),
    "ring_decode": (
        lambda q, k, v, p, n: decode.ring_decode(q, k, v, p, (0, 0, 0, 1), n, sinks=4,
                                                 window=1024, interpret=False),
        (S((1, 4, 128), BF), S((1, 2, 2000, 128), BF), S((1, 2, 2000, 128), BF),
         S((1, 2000), jnp.int32), S((1,), jnp.int32))),
}


@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compiles_for_sm90(name):
  pytest.importorskip("triton")
  from pallas_kernels.gpu import aot

  fn, args = COMPILE_CASES[name]
  kernels = aot.compile_for_gpu(fn, *args)
  assert kernels, f"{name}: no Triton kernel was lowered"
  for k in kernels:
    assert k.cubin_bytes > 0, k
    assert k.spill_bytes in (None, 0) or k.spill_bytes < 256, k
  if "attention" in name or name.endswith("sparse_prefill"):  # bf16 flash kernels use Hopper wgmma
    assert any(k.ptx_has_wgmma for k in kernels)
