"""The 16-d token indexer of each retrieval head: W_q, W_k of shape (r, head_dim).

Score s(t, j) = (W_q q_pre_t) . (W_k k_pre_j), float32, no scale, where q_pre / k_pre are
the head's query and key after any q/k norm and before RoPE. W_k belongs to the query head,
so every retrieval query head has its own r-wide compressed key stream.

With `SparseConfig.distance_buckets` > 0 (beyond the paper) each head also has a distance
bias [n_buckets]: bias[distance_bucket(query block, key block)] is added to the score of every
key, i.e. to each key block's log-mass (`block_bias`), a learned recency prior the
position-free 16-d score cannot express.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class IndexerParam(nnx.Param):
  """Indexer weights: the only parameters stage 1 trains; frozen in stage 2."""


def rotary_init(num_heads: int, r: int, head_dim: int, dtype=jnp.float32) -> np.ndarray:
  """W for the r lowest-frequency rotary channels, scaled by head_dim^-1/4 on each side so
  that W_q q . W_k k approximates q.k / sqrt(head_dim) on those channels.

  In the rotate-half layout channel i pairs with i + head_dim/2 at frequency
  theta^(-2i/head_dim); the lowest frequencies are the last r/2 of each half.
  Returns [num_heads, r, head_dim].
  """
  if r > head_dim or r % 2:
    raise ValueError(f"indexer_dim={r} must be even and <= head_dim={head_dim}")
  half = head_dim // 2
  dims = list(range(half - r // 2, half)) + list(range(head_dim - r // 2, head_dim))
  w = np.zeros((r, head_dim), np.float32)
  w[np.arange(r), dims] = head_dim ** -0.25
  return np.broadcast_to(w, (num_heads, r, head_dim)).astype(dtype)


def project(w: jax.Array, x_pre: jax.Array) -> jax.Array:
  """Compress pre-RoPE vectors. w: [heads, r, d]; x_pre: [batch, seq, heads, d] ->
  [batch, seq, heads, r] float32."""
  return jnp.einsum("hrd,bshd->bshr", w.astype(jnp.float32), x_pre.astype(jnp.float32))


def distance_bucket(q_block: jax.Array, k_block: jax.Array, n_buckets: int) -> jax.Array:
  """Log-spaced bucket of how many blocks key block k_block lies behind query block q_block:
  0 for the query's own block, 1 + floor(log2(d)) for d >= 1 blocks back, at most
  n_buckets - 1. Integer arrays broadcast; returns int32."""
  d = jnp.maximum(jnp.asarray(q_block, jnp.int32) - jnp.asarray(k_block, jnp.int32), 0)
  return jnp.minimum(32 - jax.lax.clz(d), n_buckets - 1)  # clz(0) = 32: bucket 0


def block_bias(bias: jax.Array, q_block: jax.Array, n_blocks: int) -> jax.Array:
  """The distance bias as a log-mass offset per key block.

  bias: [heads, n_buckets]; q_block: int [...], the query's block. Returns float32
  [heads, ..., n_blocks]: bias[h, distance_bucket(q_block, k)] for key block k (blocks after
  the query's fall in bucket 0; selection never reads them)."""
  bucket = distance_bucket(jnp.asarray(q_block)[..., None], jnp.arange(n_blocks),
                           bias.shape[-1])
  return jnp.take(bias.astype(jnp.float32), bucket, axis=1)


def scores(qi: jax.Array, ki: jax.Array) -> jax.Array:
  """qi: [batch, q_len, heads, r], ki: [batch, kv_len, heads, r] -> [batch, heads, q_len, kv_len]."""
  return jnp.einsum("bqhr,bkhr->bhqk", qi.astype(jnp.float32), ki.astype(jnp.float32))
