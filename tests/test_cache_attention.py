"""`ops.cache_causal_attention`: a prefill chunk over the KV cache in its own layout.

The GPU paths against `pallas_kernels.reference.cache_causal_attention` on the CPU: the
Pallas flash kernel reading [batch, kv, T, head_dim] in place (interpreter, poisoned outputs,
traced offsets incl. 0, off-tile and a chunk running past the cache end), the cuDNN path's
prefix/own-chunk split with XLA attention standing in for cuDNN, dispatch routing, and an
sm_90 compile of the kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops
from pallas_kernels import reference as ref
from pallas_kernels.gpu import cudnn_attention
from pallas_kernels.gpu import window_attention as flash

KV_MIXED = (1, 0, 1, 2, 1)  # 5 query heads on 3 KV heads, groups of unequal size
RNG = np.random.default_rng(0)  # reseeded per test from the `seed` fixture


@pytest.fixture(autouse=True)
def _seeded_rng(seed):
  global RNG
  RNG = np.random.default_rng(seed)


def _normal(shape, dtype=jnp.float32):
  return jnp.asarray(RNG.normal(size=shape), dtype)


def _close(got, want, tol):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=tol, atol=tol)


def _inputs(b=2, s=40, t=150, dtype=jnp.float32):
  q = _normal((b, s, len(KV_MIXED), 16), dtype)
  k, v = _normal((b, 3, t, 16), dtype), _normal((b, 3, t, 16), dtype)
  return q, k, v


OFFSETS = (0, 1, 37, 64, 110, 131)  # 131 + 40 > 150: the chunk runs past the cache end


def _valid_rows(x, off, t):
  """Rows of queries inside the cache (those past its end are padding in a prefill)."""
  return x[:, :max(0, min(x.shape[1], t - off))]


def test_flash_kv_major_traced_offset():
  q, k, v = _inputs()
  run = jax.jit(lambda q, k, v, off: flash.causal_attention(
      q, k, v, KV_MIXED, q_offset=off, block_q=16, block_k=32, interpret=True, kv_major=True))
  for off in OFFSETS:
    out, lse = run(q, k, v, jnp.int32(off))
    want_out, want_lse = ref.cache_causal_attention(q, k, v, KV_MIXED, q_offset=off)
    _close(_valid_rows(out, off, 150), _valid_rows(want_out, off, 150), 2e-5)
    _close(_valid_rows(lse, off, 150), _valid_rows(want_lse, off, 150), 2e-5)


def test_flash_kv_major_bf16():
  q, k, v = _inputs(b=1, s=64, t=200, dtype=jnp.bfloat16)
  out, lse = flash.causal_attention(q, k, v, KV_MIXED, q_offset=100, block_q=32, block_k=32,
                                    interpret=True, kv_major=True)
  want_out, want_lse = ref.cache_causal_attention(q, k, v, KV_MIXED, q_offset=100)
  assert out.dtype == jnp.bfloat16
  _close(out, want_out, 2e-2)
  _close(lse, want_lse, 1e-3)


def test_cudnn_path_logic(monkeypatch):
  """Prefix (padding mask, traced length) + own chunk (causal) merged by LSE, with XLA
  attention standing in for cuDNN; offset 0 has an empty prefix."""
  monkeypatch.setattr(cudnn_attention, "IMPLEMENTATION", "xla")
  q, k, v = _inputs()
  run = jax.jit(lambda q, k, v, off: cudnn_attention.cache_causal_attention(
      q, k, v, KV_MIXED, q_offset=off))
  for off in OFFSETS:
    out, lse = run(q, k, v, jnp.int32(off))
    want_out, want_lse = ref.cache_causal_attention(q, k, v, KV_MIXED, q_offset=off)
    _close(_valid_rows(out, off, 150), _valid_rows(want_out, off, 150), 2e-5)
    _close(_valid_rows(lse, off, 150), _valid_rows(want_lse, off, 150), 2e-5)


def test_dispatch_routes_to_flash_in_interpreter(monkeypatch):
  from pallas_kernels.config import KernelConfig
  from pallas_kernels.gpu import dispatch
  kernels = KernelConfig("gpu", interpret=True)
  calls = []
  real = dispatch.flash_k.causal_attention
  monkeypatch.setattr(dispatch.flash_k, "causal_attention",
                      lambda *a, **kw: calls.append(kw.get("kv_major")) or real(*a, **kw))
  q, k, v = _inputs()
  out, _ = jax.jit(lambda off: ops.cache_causal_attention(q, k, v, KV_MIXED, q_offset=off,
                                                          kernels=kernels))(jnp.int32(37))
  assert calls == [True]
  _close(out, ref.cache_causal_attention(q, k, v, KV_MIXED, q_offset=37)[0], 2e-5)
  with pytest.raises(ValueError, match="RTPURBO_CACHE_ATTN='bogus'"):
    KernelConfig.from_env({"RTPURBO_KERNELS": "gpu", "RTPURBO_CACHE_ATTN": "bogus"})


def test_kv_major_compiles_for_sm90():
  pytest.importorskip("triton")
  from pallas_kernels.gpu import aot

  s, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  kernels = aot.compile_for_gpu(
      lambda q, k, v, off: flash.causal_attention(q, k, v, (0, 0, 1, 1, 2), q_offset=off,
                                                  interpret=False, kv_major=True),
      s((1, 1024, 5, 128), bf), s((1, 3, 4096, 128), bf), s((1, 3, 4096, 128), bf),
      s((), jnp.int32))
  assert kernels and all(k.cubin_bytes > 0 for k in kernels)
  assert any(k.ptx_has_wgmma for k in kernels)
