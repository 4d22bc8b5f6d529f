"""Dense causal and sink + sliding-window prefill through cuDNN flash attention.

cuDNN (via JAX's fused-attention custom call) runs causal attention, optionally limited
to a left window (key j visible to query t iff t - window < j <= t), and returns the
log-sum-exp in float32. Sinks are a separate, tiny attention of each query over the first
`sinks` keys that the window no longer covers (j <= t - window), merged by LSE; queries
t < window see every sink inside the window already, so only the tail is merged.

cuDNN wants query head n to read KV head n // G. Arbitrary `kv_heads` (a subset of heads,
groups of unequal size) are handled by grouping query heads by KV head and issuing one
call per group size, with K/V gathered to the KV heads of that call.

Shapes: q [batch, S, q_heads, head_dim], k, v [batch, S, kv_heads_total, head_dim] with
q_offset = 0 (queries and keys aligned). bf16 / fp16 only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.gpu import common
from pallas_kernels.reference import causal_attention as reference_causal
from pallas_kernels.reference import window_attention as reference

__all__ = ["causal_attention", "window_attention", "cache_causal_attention", "dense_attention",
           "supported", "reference", "reference_causal"]


def supported(q, k, v, kv_heads, q_offset: int = 0) -> bool:
  d = q.shape[-1]
  return (q.ndim == 4 and k.shape == v.shape and q.shape[:2] == k.shape[:2]
          and q_offset == 0 and k.shape[-1] == d and d % 8 == 0 and d <= 256
          and q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
          and len(kv_heads) == q.shape[2] and all(0 <= kv < k.shape[2] for kv in kv_heads))


# "cudnn" on a GPU; tests set "xla" to run the same chunking logic on the CPU.
IMPLEMENTATION = "cudnn"


def dense_attention(q, k, v, *, window: int | None = None):
  """One cuDNN call with native GQA (q_heads = kv_heads * G). Returns (out, lse f32)."""
  d = q.shape[-1]
  if IMPLEMENTATION == "xla":
    out, lse = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla", return_residual=True,
        local_window_size=None if window is None else (window - 1, 0))
    return out, lse.astype(jnp.float32)
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
  except ImportError:  # public API: LSE comes back in q.dtype
    out, lse = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn", return_residual=True,
        local_window_size=None if window is None else (window - 1, 0))
    return out, lse.astype(jnp.float32)
  out, res = fa.dot_product_attention(
      q, k, v, scale=1.0 / math.sqrt(d), mask_type=fa.MaskType.CAUSAL,
      sliding_window_length=window, return_residual=True)
  return out, jnp.swapaxes(res, 1, 2).astype(jnp.float32)  # residual is [b, heads, S]


def _grouped(q, k, v, kv_heads, window):
  """cuDNN over arbitrary kv_heads: one call per group size, results in head order."""
  kv_ids, members = common.kv_groups(kv_heads)
  by_size: dict[int, list[int]] = {}
  for g, m in enumerate(members):
    by_size.setdefault(len(m), []).append(g)
  outs, lses, order = [], [], []
  for size, groups in by_size.items():
    heads = [h for g in groups for h in members[g]]
    kvs = [kv_ids[g] for g in groups]
    qs = q if heads == list(range(q.shape[2])) else q[:, :, jnp.asarray(heads)]
    if kvs == list(range(k.shape[2])):
      ks, vs = k, v
    else:
      ks, vs = k[:, :, jnp.asarray(kvs)], v[:, :, jnp.asarray(kvs)]
    o, l = dense_attention(qs, ks, vs, window=window)
    outs.append(o)
    lses.append(l)
    order += heads
    del size
  if len(outs) == 1 and order == list(range(q.shape[2])):
    return outs[0], lses[0]
  inv = [0] * len(order)
  for pos, h in enumerate(order):
    inv[h] = pos
  inv = jnp.asarray(inv)
  return jnp.concatenate(outs, axis=2)[:, :, inv], jnp.concatenate(lses, axis=2)[:, :, inv]


def _sink_tail(q_tail, k, v, kv_heads, sinks):
  """Attention of queries t = window + i over sink keys j <= i. Returns (out f32, lse)."""
  d = q_tail.shape[-1]
  kh = k[:, :sinks, jnp.asarray(kv_heads)]  # [b, sinks, hq, d]
  vh = v[:, :sinks, jnp.asarray(kv_heads)].astype(jnp.float32)
  # Input dtype products with fp32 accumulation, as in the flash kernels.
  s = jnp.einsum("bqhd,bkhd->bqhk", q_tail, kh,
                 preferred_element_type=jnp.float32) / math.sqrt(d)
  i = jnp.arange(q_tail.shape[1])[:, None, None]
  s = jnp.where(jnp.arange(sinks)[None, None, :] <= i, s, common.NEG_INF)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])  # the first sink is visible to every tail query
  return jnp.einsum("bqhk,bkhd->bqhd", p, vh), lse


@functools.partial(jax.jit, static_argnames=("kv_heads",))
def causal_attention_jit(q, k, v, *, kv_heads):
  return _grouped(q, k, v, kv_heads, None)


@functools.partial(jax.jit, static_argnames=("kv_heads", "sinks", "window"))
def window_attention_jit(q, k, v, *, kv_heads, sinks, window):
  s = q.shape[1]
  if window >= s:
    return _grouped(q, k, v, kv_heads, None)
  out, lse = _grouped(q, k, v, kv_heads, window)
  if sinks <= 0:
    return out, lse
  # Queries t >= window may also see sinks j <= t - window, outside their window.
  o_s, l_s = _sink_tail(q[:, window:], k, v, kv_heads, min(sinks, s - window))
  o_w, l_w = out[:, window:].astype(jnp.float32), lse[:, window:]
  total = jnp.logaddexp(l_w, l_s)
  merged = o_w * jnp.exp(l_w - total)[..., None] + o_s * jnp.exp(l_s - total)[..., None]
  out = jax.lax.dynamic_update_slice_in_dim(out, merged.astype(out.dtype), window, axis=1)
  lse = jax.lax.dynamic_update_slice_in_dim(lse, total, window, axis=1)
  return out, lse


def _merge(parts):
  """LSE-merge [(out, lse)] over disjoint key sets; out in the first part's dtype."""
  total = parts[0][1]
  for _, l in parts[1:]:
    total = jnp.logaddexp(total, l)
  safe = jnp.where(jnp.isfinite(total), total, 0.0)
  out = sum(o.astype(jnp.float32) * jnp.exp(l - safe)[..., None] for o, l in parts)
  return out.astype(parts[0][0].dtype), total


@functools.partial(jax.jit, static_argnames=("kv_heads", "sinks", "window"))
def window_attention_chunked_jit(q, k, v, *, kv_heads, sinks, window):
  """Sink + window attention from two *causal* cuDNN calls over window-sized chunks.

  With chunks of C = window tokens, query a of chunk i (t = iC + a) sees keys (t - C, t]:
  keys c <= a of its own chunk (causal attention of the chunk on itself, chunks as batch)
  and keys c > a of chunk i - 1. The second set becomes causal after reversing both the
  previous chunk's keys and the queries, with the queries shifted by one row: row
  r = C - 2 - a sees reversed keys c' <= r (row C - 1 is a dummy, query C - 1 has no key
  there). Both calls run cuDNN's causal kernel, faster than its sliding-window mask; the
  parts and the sinks are merged by LSE.
  """
  b, s, hq, d = q.shape
  c = window
  n = -(-s // c)
  pad = n * c - s
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  hk = k.shape[2]
  as_batch = lambda x, m: x.reshape(b * m, c, x.shape[2], d)  # noqa: E731
  o_own, l_own = _grouped(as_batch(q, n), as_batch(k, n), as_batch(v, n), kv_heads, None)
  o_own = o_own.reshape(b, n, c, hq, d)
  l_own = l_own.reshape(b, n, c, hq)
  # Previous-chunk part for chunks 1..n-1.
  qn = q[:, c:].reshape(b, n - 1, c, hq, d)
  q_rev = jnp.concatenate([jnp.flip(qn[:, :, :c - 1], axis=2),
                           jnp.zeros((b, n - 1, 1, hq, d), q.dtype)], axis=2)
  k_rev = jnp.flip(k[:, :(n - 1) * c].reshape(b, n - 1, c, hk, d), axis=2)
  v_rev = jnp.flip(v[:, :(n - 1) * c].reshape(b, n - 1, c, hk, d), axis=2)
  o_prev, l_prev = _grouped(q_rev.reshape(b * (n - 1), c, hq, d),
                            k_rev.reshape(b * (n - 1), c, hk, d),
                            v_rev.reshape(b * (n - 1), c, hk, d), kv_heads, None)
  o_prev = jnp.flip(o_prev.reshape(b, n - 1, c, hq, d)[:, :, :c - 1], axis=2)
  l_prev = jnp.flip(l_prev.reshape(b, n - 1, c, hq)[:, :, :c - 1], axis=2)
  o_prev = jnp.pad(o_prev, ((0, 0), (1, 0), (0, 1), (0, 0), (0, 0)))
  l_prev = jnp.pad(l_prev, ((0, 0), (1, 0), (0, 1), (0, 0)), constant_values=common.NEG_INF)
  parts = [(o_own.reshape(b, n * c, hq, d), l_own.reshape(b, n * c, hq)),
           (o_prev.reshape(b, n * c, hq, d), l_prev.reshape(b, n * c, hq))]
  if sinks > 0:
    o_s, l_s = _sink_tail(q[:, window:], k, v, kv_heads, min(sinks, s - window))
    o_s = jnp.pad(o_s, ((0, 0), (window, 0), (0, 0), (0, 0)))
    l_s = jnp.pad(l_s, ((0, 0), (window, 0), (0, 0)), constant_values=common.NEG_INF)
    parts.append((o_s, l_s))
  out, lse = _merge(parts)
  return out[:, :s], lse[:, :s]


def causal_attention(q, k, v, kv_heads, *, q_offset: int = 0, chunk: int = 512):
  """Dense causal prefill (reference contract; q_offset must be 0). Returns (out, lse)."""
  del chunk
  if q_offset:
    raise ValueError("cudnn causal_attention: q_offset must be 0")
  return causal_attention_jit(q, k, v, kv_heads=tuple(int(x) for x in kv_heads))


def window_attention(q, k, v, kv_heads, *, sinks: int, window: int, q_offset: int = 0,
                     chunk: int = 512, chunked: bool = False):
  """Sink + sliding-window prefill (reference contract; q_offset must be 0).

  chunked=False: cuDNN's sliding-window mask; True: two causal calls over window-sized
  chunks (`window_attention_chunked_jit`), used when the sequence spans > 2 windows.
  """
  del chunk
  if q_offset:
    raise ValueError("cudnn window_attention: q_offset must be 0")
  kv_heads = tuple(int(x) for x in kv_heads)
  if chunked and q.shape[1] > 2 * window and window >= 2:
    return window_attention_chunked_jit(q, k, v, kv_heads=kv_heads, sinks=int(sinks),
                                        window=int(window))
  return window_attention_jit(q, k, v, kv_heads=kv_heads, sinks=int(sinks),
                              window=int(window))


# ---------------------------------------------------------------------------
# A prefill chunk over the KV cache (chunked prefill of retrieval heads).


def _prefix_attention(q_t, k, v, kv_len):
  """q_t [b, hq, s, d] over keys [0, kv_len) of k, v [b, hq // G, T, d] (native GQA, BNTH).

  kv_len: int32 [b] (traced); cuDNN's padding mask bounds the key loop by it. Returns
  (out [b, hq, s, d], lse [b, hq, s] f32).
  """
  b, hq, s, d = q_t.shape
  if IMPLEMENTATION == "xla":
    out, lse = jax.nn.dot_product_attention(
        jnp.swapaxes(q_t, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
        implementation="xla", key_value_seq_lengths=kv_len, return_residual=True)
    return jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse, 1, 2).astype(jnp.float32)
  from jax._src.cudnn import fused_attention_stablehlo as fa
  q_len = jnp.full((b,), s, jnp.int32)
  out, res = fa.dot_product_attention(
      q_t, k, v, q_seqlen=q_len, kv_seqlen=kv_len, scale=1.0 / math.sqrt(d),
      mask_type=fa.MaskType.PADDING, qkv_layout="BNTH", return_residual=True)
  return out, res.astype(jnp.float32)


def _grouped_prefix(q_t, k_cache, v_cache, kv_heads, kv_len):
  """`_prefix_attention` for arbitrary kv_heads: one call per group size (as `_grouped`)."""
  kv_ids, members = common.kv_groups(kv_heads)
  by_size: dict[int, list[int]] = {}
  for g, m in enumerate(members):
    by_size.setdefault(len(m), []).append(g)
  outs, lses, order = [], [], []
  for groups in by_size.values():
    heads = [h for g in groups for h in members[g]]
    kvs = [kv_ids[g] for g in groups]
    qs = q_t if heads == list(range(q_t.shape[1])) else q_t[:, jnp.asarray(heads)]
    if kvs == list(range(k_cache.shape[1])):
      ks, vs = k_cache, v_cache
    else:
      ks, vs = k_cache[:, jnp.asarray(kvs)], v_cache[:, jnp.asarray(kvs)]
    o, l = _prefix_attention(qs, ks, vs, kv_len)
    outs.append(o)
    lses.append(l)
    order += heads
  inv = [0] * len(order)
  for pos, h in enumerate(order):
    inv[h] = pos
  inv = jnp.asarray(inv)
  return jnp.concatenate(outs, axis=1)[:, inv], jnp.concatenate(lses, axis=1)[:, inv]


@functools.partial(jax.jit, static_argnames=("kv_heads",))
def cache_causal_attention_jit(q, k_cache, v_cache, q_offset, *, kv_heads):
  b, s = q.shape[:2]
  # Prefix: keys [0, q_offset), all visible (padding mask; an empty prefix is dropped below).
  kv_len = jnp.full((b,), jnp.maximum(q_offset, 1), jnp.int32)
  o_p, l_p = _grouped_prefix(jnp.swapaxes(q, 1, 2), k_cache, v_cache, kv_heads, kv_len)
  o_p, l_p = jnp.swapaxes(o_p, 1, 2), jnp.swapaxes(l_p, 1, 2)
  l_p = jnp.where(q_offset > 0, l_p, common.NEG_INF)
  o_p = jnp.where(q_offset > 0, o_p, jnp.zeros_like(o_p))
  # The chunk's own keys [q_offset, q_offset + s): causal, aligned with the queries.
  # Slots past the cache end (padding queries of a last chunk) are clipped: no valid query
  # sees them.
  idx = jnp.clip(q_offset + jnp.arange(s, dtype=jnp.int32), 0, k_cache.shape[2] - 1)
  own = lambda c: jnp.swapaxes(jnp.take(c, idx, axis=2), 1, 2)  # noqa: E731
  o_c, l_c = _grouped(q, own(k_cache), own(v_cache), kv_heads, None)
  return _merge([(o_c, l_c), (o_p, l_p)])


def cache_causal_attention(q, k_cache, v_cache, kv_heads, *, q_offset=0, chunk: int = 512):
  """Reference contract of `cache_causal_attention` from two cuDNN calls merged by LSE:
  the chunk over the cache prefix [0, q_offset) (padding mask, traced length) and over its
  own keys (causal). Returns (out, lse)."""
  del chunk
  return cache_causal_attention_jit(q, k_cache, v_cache, jnp.asarray(q_offset, jnp.int32),
                                    kv_heads=tuple(int(x) for x in kv_heads))
