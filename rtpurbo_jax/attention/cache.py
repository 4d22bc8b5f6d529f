"""The mixed KV cache: full K/V only where a selected or dense head reads it, rings elsewhere.

Per layer (`LayerCache`), over the KV heads `routing.HeadRouting` names (full_kv, ring_kv):
  full_k, full_v: [batch, n_full_kv, max_len, head_dim]   KV heads of selected / dense heads
  ring_k, ring_v: [batch, n_ring_kv, capacity, head_dim]  local-only KV heads
  ring_pos:       [batch, capacity] int32                 position held by each ring slot, -1 empty
  ckeys:          [batch, n_selected, max_len, r]         W_k k_pre of each selected head
  length:         [batch] int32                           tokens written so far

Ring layout: the first `sinks` slots hold positions 0..sinks-1; position j >= sinks lives in
slot sinks + (j - sinks) % (capacity - sinks). `capacity = SparseConfig.ring_capacity`
covers sinks + window and the dense fallback below `seqlen_threshold`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rtpurbo_jax.attention import routing as routing_lib
from rtpurbo_jax.config import ModelConfig, SparseConfig

CACHE_AXES = {
    "full_k": ("batch", "kv_heads", "cache_seq", None),
    "full_v": ("batch", "kv_heads", "cache_seq", None),
    "ring_k": ("batch", "kv_heads", None, None),
    "ring_v": ("batch", "kv_heads", None, None),
    "ring_pos": ("batch", None),
    "ckeys": ("batch", "heads", "cache_seq", None),
    "length": ("batch",),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
  full_k: jax.Array
  full_v: jax.Array
  ring_k: jax.Array
  ring_v: jax.Array
  ring_pos: jax.Array
  ckeys: jax.Array
  length: jax.Array

  @property
  def max_len(self) -> int:
    return self.full_k.shape[2]


def init_layer_cache(routing: routing_lib.HeadRouting, cfg: ModelConfig, sparse: SparseConfig,
                     batch: int, max_len: int, dtype) -> LayerCache:
  bs = sparse.block_size
  max_len = -(-max_len // bs) * bs  # whole blocks for the selection kernels
  cap = sparse.ring_capacity if routing.ring_kv else 0
  d = cfg.head_dim
  return LayerCache(
      full_k=jnp.zeros((batch, len(routing.full_kv), max_len, d), dtype),
      full_v=jnp.zeros((batch, len(routing.full_kv), max_len, d), dtype),
      ring_k=jnp.zeros((batch, len(routing.ring_kv), cap, d), dtype),
      ring_v=jnp.zeros((batch, len(routing.ring_kv), cap, d), dtype),
      ring_pos=jnp.full((batch, cap), -1, jnp.int32),
      ckeys=jnp.zeros((batch, len(routing.selected), max_len, sparse.indexer_dim), dtype),
      length=jnp.zeros((batch,), jnp.int32),
  )


def ring_slot(pos: jax.Array, sinks: int, capacity: int) -> jax.Array:
  """Ring slot of absolute position `pos` (any int array)."""
  ring = capacity - sinks
  return jnp.where(pos < sinks, pos, sinks + (pos - sinks) % max(ring, 1))


def full_view(cache: LayerCache):
  """The full cache as attention keys: full_k, full_v [batch, max_len, n_full_kv, head_dim]
  and the position of each slot [batch, max_len] int32 (-1 from `length` on)."""
  t = cache.max_len
  pos = jnp.where(jnp.arange(t)[None] < cache.length[:, None], jnp.arange(t)[None], -1)
  return jnp.swapaxes(cache.full_k, 1, 2), jnp.swapaxes(cache.full_v, 1, 2), pos


def write(cache: LayerCache, routing: routing_lib.HeadRouting, k, v, ck, positions, valid,
          sparse: SparseConfig) -> LayerCache:
  """Write new tokens.

  k, v: [batch, n, kv_heads, head_dim] (all KV heads); ck: [batch, n, n_selected, r] or None;
  positions: [batch, n] int32; valid: [batch, n] bool (padding is not written).
  """
  b, n = positions.shape
  bidx = jnp.arange(b)[:, None]
  out = dataclasses.replace(cache)
  if routing.full_kv:
    # Invalid tokens go out of range and are dropped.
    slot = jnp.where(valid, positions, cache.max_len)
    sel = jnp.asarray(routing.full_kv)
    out.full_k = cache.full_k.at[bidx, :, slot].set(k[:, :, sel].astype(cache.full_k.dtype),
                                                    mode="drop")
    out.full_v = cache.full_v.at[bidx, :, slot].set(v[:, :, sel].astype(cache.full_v.dtype),
                                                    mode="drop")
  if routing.selected and ck is not None:
    slot = jnp.where(valid, positions, cache.max_len)
    out.ckeys = cache.ckeys.at[bidx, :, slot].set(ck.astype(cache.ckeys.dtype), mode="drop")
  if routing.ring_kv:
    cap = cache.ring_pos.shape[1]
    slot = ring_slot(positions, sparse.sinks, cap)
    # Within one write, only the newest token per slot may land (older ones are evicted).
    newest = positions + (cap - sparse.sinks) >= jnp.max(
        jnp.where(valid, positions, -1), axis=1, keepdims=True) + 1
    keep = valid & (newest | (positions < sparse.sinks))
    slot = jnp.where(keep, slot, cap)
    sel = jnp.asarray(routing.ring_kv)
    out.ring_k = cache.ring_k.at[bidx, :, slot].set(k[:, :, sel].astype(cache.ring_k.dtype),
                                                    mode="drop")
    out.ring_v = cache.ring_v.at[bidx, :, slot].set(v[:, :, sel].astype(cache.ring_v.dtype),
                                                    mode="drop")
    out.ring_pos = cache.ring_pos.at[bidx, slot].set(positions, mode="drop")
  out.length = jnp.maximum(cache.length, jnp.max(jnp.where(valid, positions + 1, 0), axis=1))
  return out
