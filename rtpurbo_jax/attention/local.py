"""Local heads: key j is visible to query t iff `j <= t and (j < sinks or t - window < j)`;
below `seqlen_threshold` tokens of context (an inactive row) every causal key is visible.

Three settings, each over the heads of one `routing.HeadGroup`:
  a whole sequence without a cache (`over_sequence`);
  a prefill chunk against the cache (`ring_chunk`, `full_chunk`): with `contiguous` chunks
    through the window kernel at a traced offset in bounded memory, else `masked_attention`;
  a decode step (`ring_step`, `full_step`): the ring decode kernel.
`ring_*` serve heads whose KV head keeps only a ring, `full_*` heads whose KV head keeps the
full cache (it also serves a selected head).

Shapes: q [batch, seq, heads, head_dim] (decode: [batch, heads, head_dim]); chunk keys
[batch, seq, kv_heads, head_dim]; caches as in cache.py. `kv_slots` index the cache array
the function reads (ring_k or full_k), `kv_heads` the model's KV heads. Every function
returns [batch, seq, heads, head_dim] ([batch, heads, head_dim] for a decode step) in q.dtype.
`kernels` is the layer's `KernelConfig`, passed to every `pallas_kernels.ops` call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import ops
from pallas_kernels.config import KernelConfig
from rtpurbo_jax.attention import cache as cache_lib
from rtpurbo_jax.config import SparseConfig


def _rule(sp: SparseConfig, active) -> dict:
  return dict(sinks=sp.sinks, window=sp.window, sparse_active=active)


# ---------------------------------------------------------------------------
# A whole sequence (training, scoring, calibration).


def over_sequence(q, k, v, kv_heads, positions, k_pos, active, sp: SparseConfig,
                  kernels: KernelConfig, *, contiguous: bool, differentiable: bool):
  """Local heads of one sequence over itself.

  k, v: [batch, seq, kv_heads, head_dim]; positions: [batch, seq]; k_pos: [batch, seq], -1
  at padding; active: [batch] bool. contiguous: positions are 0..seq-1 and nothing is padded
  (then every row is active iff seq >= seqlen_threshold). differentiable: the caller may take
  gradients (stage 2) or scores decode-style: a contiguous sequence then takes the banded
  jnp form.
  """
  s = q.shape[1]
  static_sparse = s >= sp.seqlen_threshold
  if contiguous and differentiable:
    # The window kernels have no VJP, and the jnp `window_attention` scores all S keys. The
    # banded form is differentiable and O(S x window) on every backend; window=s is exactly
    # causal (below the threshold).
    from pallas_kernels import reference
    o, _ = reference.banded_window_attention(q, k, v, kv_heads, sinks=sp.sinks,
                                             window=sp.window if static_sparse else s)
  elif contiguous and static_sparse:
    o, _ = ops.window_attention(q, k, v, kv_heads, sinks=sp.sinks, window=sp.window,
                                kernels=kernels)
  elif contiguous:
    o, _ = ops.causal_attention(q, k, v, kv_heads, kernels=kernels)
  else:
    o, _ = ops.masked_attention(q, k, v, positions, k_pos, kv_heads, chunk=sp.chunk_size,
                                **_rule(sp, active))
  return o


# ---------------------------------------------------------------------------
# Decode steps: the new token is already written.


def ring_step(q, cache: cache_lib.LayerCache, kv_slots, q_pos, active, sp: SparseConfig,
              kernels: KernelConfig):
  """Heads on ring KV heads. Eviction only ever drops positions outside the window, so the
  ring holds every visible key. q: [batch, heads, head_dim]; q_pos: [batch]."""
  o, _ = ops.ring_decode(q, cache.ring_k, cache.ring_v, cache.ring_pos, kv_slots, q_pos,
                         **_rule(sp, active), kernels=kernels)
  return o


def full_step(q, cache: cache_lib.LayerCache, kv_slots, q_pos, active, sp: SparseConfig,
              kernels: KernelConfig):
  """Heads on full-cache KV heads. Only the sinks and the newest ring_capacity slots can be
  visible: read those (`recent_slots`), not all T."""
  rk, rv, rpos = recent_slots(cache.full_k, cache.full_v, cache.length, sp)
  o, _ = ops.ring_decode(q, rk, rv, rpos, kv_slots, q_pos, **_rule(sp, active),
                         kernels=kernels)
  return o


def recent_slots(k_cache, v_cache, length, sp: SparseConfig):
  """A ring-like view of a full cache for local-head decode.

  k_cache, v_cache: [batch, kv, T, head_dim]; length: [batch]. Returns keys, values
  [batch, kv, sinks + span, head_dim] and their positions [batch, sinks + span] (-1 empty):
  the sinks plus the newest span = ring_capacity - sinks slots, which hold every key a local
  head may see (window, or everything below the dense-fallback threshold).
  """
  t = k_cache.shape[2]
  span = min(t, sp.ring_capacity - sp.sinks)
  n_sink = min(sp.sinks, t)
  start = jnp.clip(length - span, 0, t - span)  # [batch]
  take = jax.vmap(lambda c, s0: jax.lax.dynamic_slice_in_dim(c, s0, span, axis=1))
  pos_w = start[:, None] + jnp.arange(span, dtype=jnp.int32)[None]
  pos_w = jnp.where(pos_w < length[:, None], pos_w, -1)
  sink_ids = jnp.arange(n_sink, dtype=jnp.int32)[None]
  pos_s = jnp.where(sink_ids < start[:, None], sink_ids, -1)  # not already in the span
  keys = jnp.concatenate([k_cache[:, :, :n_sink], take(k_cache, start)], axis=2)
  vals = jnp.concatenate([v_cache[:, :, :n_sink], take(v_cache, start)], axis=2)
  return keys, vals, jnp.concatenate([pos_s, pos_w], axis=1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Prefill chunks.


def ring_chunk(q, ring_before, k, v, new: cache_lib.LayerCache, kv_slots, positions, valid,
               active, sp: SparseConfig, kernels: KernelConfig, *, contiguous: bool):
  """Heads on ring KV heads for a prefill chunk.

  ring_before: (ring_k, ring_v, ring_pos) before this chunk was written; k, v: the chunk's
  keys / values of the ring KV heads [batch, seq, n_ring_kv, head_dim]; new: the cache after
  the write; positions, valid: [batch, seq]. A chunk may evict ring entries its own early
  queries need, so both forms read the ring as it was plus the chunk.
  """
  if contiguous:
    return _ring_chunk_window(q, ring_before[:2], (k, v), new, kv_slots, positions[0, 0],
                              active, sp, kernels)
  rk, rv, rpos = ring_before
  keys = jnp.concatenate([jnp.swapaxes(rk, 1, 2), k.astype(rk.dtype)], axis=1)
  vals = jnp.concatenate([jnp.swapaxes(rv, 1, 2), v.astype(rv.dtype)], axis=1)
  kpos = jnp.concatenate([rpos, jnp.where(valid, positions, -1)], axis=1)
  o, _ = ops.masked_attention(q, keys, vals, positions, kpos, kv_slots, chunk=sp.chunk_size,
                              **_rule(sp, active))
  return o


def full_chunk(q, new: cache_lib.LayerCache, kv_slots, positions, active, sp: SparseConfig,
               kernels: KernelConfig, *, contiguous: bool):
  """Heads on full-cache KV heads for a prefill chunk; new: the cache after its write."""
  if contiguous:
    return _full_chunk_window(q, new.full_k, new.full_v, kv_slots, positions[0, 0], active, sp,
                              kernels)
  full_k, full_v, full_pos = cache_lib.full_view(new)
  o, _ = ops.masked_attention(q, full_k, full_v, positions, full_pos, kv_slots,
                              chunk=sp.chunk_size, **_rule(sp, active))
  return o


def _ring_chunk_window(q, ring_before, chunk_kv, new, kv_slots, p0, active, sp: SparseConfig,
                       kernels: KernelConfig):
  """`ring_chunk` of a contiguous chunk, through the window kernel.

  q at positions p0..p0+s-1 (p0 traced); ring_before: ring_k, ring_v [batch, n_ring_kv,
  capacity, head_dim] before this chunk was written; chunk_kv: the chunk's k, v. Two disjoint
  parts, merged by log-sum-exp:
    window: keys t - window < j <= t. The ring's slots for positions [start, p0),
      start = max(0, p0 - window + 1), are gathered in position order and followed by the
      chunk's keys: a contiguous key range of static length window - 1 + s in which the
      chunk starts at the traced offset p0 - start, so `ops.window_attention` (sinks=0)
      reads it with no [s, capacity + s] score matrix. The ring holds every such position
      (capacity - sinks >= window > p0 - start). Slots past the chunk's end (when
      p0 < window - 1) are causally invisible.
    prefix: keys j <= t - window that are sinks, or any (inactive rows, below the threshold):
      as in `_full_chunk_window`, over the first slots of the new ring, whose `ring_pos`
      names each slot's position (below the threshold nothing has been evicted yet).
  """
  b, s = q.shape[:2]
  cap = ring_before[0].shape[2]
  span = sp.window - 1
  start = jnp.maximum(p0 - span, 0)
  pos = start + jnp.arange(span + s, dtype=jnp.int32)  # position of each gathered key
  # Index into [ring slots (cap) ++ chunk (s)]: history from its ring slot, the rest from
  # the chunk (clipped past its end: those keys are never visible).
  idx = jnp.where(pos < p0, cache_lib.ring_slot(pos, sp.sinks, cap), cap + pos - p0)
  idx = jnp.clip(idx, 0, cap + s - 1)

  def keys(ring, chunk):
    both = jnp.concatenate([jnp.swapaxes(ring, 1, 2), chunk.astype(ring.dtype)], axis=1)
    return jnp.take(both, idx, axis=1)  # [b, span + s, n_ring_kv, d]

  kw, vw = keys(ring_before[0], chunk_kv[0]), keys(ring_before[1], chunk_kv[1])
  window = ops.window_attention(q, kw, vw, kv_slots, sinks=0, window=sp.window,
                                q_offset=p0 - start, chunk=sp.chunk_size, kernels=kernels)
  q_shift = jnp.broadcast_to(p0 + jnp.arange(s, dtype=jnp.int32)[None] - sp.window, (b, s))

  def prefix(n):
    n = min(cap, n)
    if n == 0:
      return (jnp.zeros(q.shape, q.dtype), jnp.full((b, s, q.shape[2]), -jnp.inf))
    kp = jnp.swapaxes(new.ring_k[:, :, :n], 1, 2)
    vp = jnp.swapaxes(new.ring_v[:, :, :n], 1, 2)
    return ops.masked_attention(q, kp, vp, q_shift, new.ring_pos[:, :n], kv_slots,
                                sinks=sp.sinks, window=0, sparse_active=active,
                                chunk=sp.chunk_size)

  return _merge_with_prefix(window, prefix, cap, sp, active)


def _full_chunk_window(q, k_cache, v_cache, kv_slots, p0, active, sp: SparseConfig,
                       kernels: KernelConfig):
  """`full_chunk` of a contiguous chunk, in bounded memory.

  q at positions p0..p0+s-1 (p0 traced); k_cache, v_cache: [batch, n_full_kv, max_len,
  head_dim], the chunk already written. Two disjoint parts, merged by log-sum-exp:
    window: keys t - window < j <= t, read from a static-length slice [start, start + L),
      L = window - 1 + s, through `ops.window_attention` (sinks=0, shifted q_offset);
    prefix: keys j <= t - window that are sinks (j < sinks) or, below the threshold
      (inactive rows), any such key: `masked_attention` over the first P slots with query
      positions shifted by -window. P = sinks when every row is active, else
      max(sinks, seqlen_threshold), picked by lax.cond so both branches stay small.
  """
  b, s = q.shape[:2]
  t = k_cache.shape[2]
  span = min(t, sp.window - 1 + s)
  start = jnp.clip(p0 - sp.window + 1, 0, t - span)
  kw = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(k_cache, start, span, axis=2), 1, 2)
  vw = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(v_cache, start, span, axis=2), 1, 2)
  window = ops.window_attention(q, kw, vw, kv_slots, sinks=0, window=sp.window,
                                q_offset=p0 - start, chunk=sp.chunk_size, kernels=kernels)
  q_shift = p0 + jnp.arange(s, dtype=jnp.int32)[None] - sp.window  # j <= t - window

  def prefix(n):
    n = min(t, n)
    if n == 0:
      return (jnp.zeros(q.shape, q.dtype), jnp.full((b, s, q.shape[2]), -jnp.inf))
    kp = jnp.swapaxes(k_cache[:, :, :n], 1, 2)
    vp = jnp.swapaxes(v_cache[:, :, :n], 1, 2)
    kpos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    # window=0 leaves exactly "j < sinks, or inactive" on top of j <= t - window.
    return ops.masked_attention(q, kp, vp, jnp.broadcast_to(q_shift, (b, s)), kpos, kv_slots,
                                sinks=sp.sinks, window=0, sparse_active=active,
                                chunk=sp.chunk_size)

  return _merge_with_prefix(window, prefix, t, sp, active)


def _merge_with_prefix(window, prefix, slots: int, sp: SparseConfig, active):
  """Merge (by log-sum-exp) a window part with the prefix part `prefix(n)` over the first n of
  `slots` key slots: n = sinks when every row is sparse-active, else max(sinks,
  seqlen_threshold), chosen by lax.cond so that both branches stay small."""
  wide = max(sp.sinks, sp.seqlen_threshold)
  if min(slots, wide) == min(slots, sp.sinks):
    pre = prefix(sp.sinks)
  else:
    pre = jax.lax.cond(jnp.all(active), lambda: prefix(sp.sinks), lambda: prefix(wide))
  out, _ = ops.merge_attention([window, pre])
  return out
