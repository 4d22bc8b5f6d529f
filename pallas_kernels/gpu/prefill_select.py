"""Sparse-prefill selection: pooled indexer queries vs every causal key block, then top-p.

Definition (the reference's, `cache_prefill_select`): query block i of a chunk at q_offset
(global block g = q_offset // block_size + i) is represented by the mean of its indexer
queries at positions < length; key block j gets the exact log-sum-exp of that pooled
query's scores over the block's keys below min(length, (g + 1) * block_size), in fp32.
Top-p per query block over those log-masses. The whole-sequence `prefill_select` is the
same with q_offset 0 and length = S.

Pass 1, kernel `pooled_block_logmass`, grid (query tiles, key tiles, batch * heads): a
program owns a [QT query blocks, KT key blocks] tile of the log-mass matrix, walks the key
blocks of its tile that some query block of the tile may read (one [block_size, r] load
each from the compressed-key cache, scored against all QT pooled queries by one fp32 dot),
reduces each to a log-sum-exp column and writes the tile once. Tiles entirely above the
causal diagonal or past the row's length return at once (their entries are never read).
The chunk's block offset and the lengths are runtime inputs: one kernel for every chunk.
Pass 2: `topp_rows.select_rows` with n_valid = the own block + 1.

Shapes: qi [batch, s, r_heads, r]; ckeys [batch, r_heads, T, r] (the cache layout);
s, T, q_offset multiples of block_size.
Returns bool [batch, r_heads, s // block_size, T // block_size].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gpu import common, topp_rows
from pallas_kernels.reference import cache_prefill_select as reference_cache
from pallas_kernels.reference import pooled_query_blocks
from pallas_kernels.reference import prefill_select as reference

__all__ = ["prefill_select", "cache_prefill_select", "pooled_block_logmass", "supported",
           "reference", "reference_cache"]

TILE = 64  # query blocks and key blocks per program


def _kernel(meta_ref, len_ref, pooled_ref, ck_ref, lm_ref, *, bs, qt, kt, heads, nk,
            precision):
  iq, ik, bh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b, h = bh // heads, bh % heads
  length = len_ref[b]
  k_first = ik * kt
  last_g = meta_ref[0] + iq * qt + qt - 1  # global index of the tile's last query block
  # Key blocks this tile needs: <= last_g, below the row's length and inside the cache.
  n_blocks = jnp.minimum(jnp.minimum(last_g + 1, (length + bs - 1) // bs), nk) - k_first
  n_blocks = jnp.minimum(n_blocks, kt)

  @pl.when(n_blocks > 0)
  def _():
    pooled = pooled_ref[bh, pl.ds(iq * qt, qt), :]  # [qt, r] f32
    col = jax.lax.broadcasted_iota(jnp.int32, (qt, kt), 1)
    kcol = jax.lax.broadcasted_iota(jnp.int32, (qt, bs), 1)

    def body(jj, tile):
      j = k_first + jj
      keys = ck_ref[b, h, pl.ds(j * bs, bs), :].astype(jnp.float32)  # [bs, r]
      s = common.dot_nt(pooled, keys, precision)  # [qt, bs]
      s = jnp.where(j * bs + kcol < length, s, common.NEG_INF)
      m = jnp.max(s, axis=1)
      m_safe = jnp.where(m == common.NEG_INF, 0.0, m)
      lse = jnp.log(jnp.sum(jnp.exp(s - m_safe[:, None]), axis=1)) + m_safe
      return jnp.where(col == jj, lse[:, None], tile)

    tile = jax.lax.fori_loop(0, n_blocks, body,
                             jnp.full((qt, kt), common.NEG_INF, jnp.float32))
    lm_ref[bh, pl.ds(iq * qt, qt), pl.ds(k_first, kt)] = tile


@functools.partial(jax.jit, static_argnames=("block_size", "tile", "interpret"))
def pooled_block_logmass(pooled, ckeys, lengths, q_offset, *, block_size: int = 64,
                         tile: int = TILE, interpret: bool = False):
  """pooled: [batch, nq, r_heads, r] (`pooled_query_blocks`). Returns [batch, r_heads, nq,
  nk_pad] f32 log-masses (nk_pad = T // block_size rounded up to the key tile); entries past
  a row's own block are unspecified."""
  b, nq, h, r = pooled.shape
  nk = ckeys.shape[2] // block_size
  r_pad = max(16, common.next_pow2(r))
  pooled = jnp.transpose(pooled, (0, 2, 1, 3)).reshape(b * h, nq, r)
  if r_pad != r:  # the fp32 dot needs K >= 16; zero columns change no score
    pooled = jnp.pad(pooled, ((0, 0), (0, 0), (0, r_pad - r)))
    ckeys = jnp.pad(ckeys, ((0, 0), (0, 0), (0, 0), (0, r_pad - r)))
  qt = min(tile, max(16, common.next_pow2(nq)))
  kt = min(tile, max(16, common.next_pow2(nk)))
  nq_pad, nk_pad = common.cdiv(nq, qt) * qt, common.cdiv(nk, kt) * kt
  if nq_pad != nq:
    pooled = jnp.pad(pooled, ((0, 0), (0, nq_pad - nq), (0, 0)))
  meta = jnp.reshape(q_offset // block_size, (1,)).astype(jnp.int32)
  lm = pl.pallas_call(
      functools.partial(_kernel, bs=block_size, qt=qt, kt=kt, heads=h, nk=nk,
                        precision=jax.lax.Precision.HIGHEST),
      grid=(nq_pad // qt, nk_pad // kt, b * h),
      in_specs=[common.full_spec()] * 4,
      out_specs=common.full_spec(),
      out_shape=jax.ShapeDtypeStruct((b * h, nq_pad, nk_pad), jnp.float32),
      compiler_params=common.params(4, 2),
      interpret=interpret,
      name="pooled_block_logmass",
  )(meta, lengths.astype(jnp.int32), pooled, ckeys)
  return lm[:, :nq].reshape(b, h, nq, nk_pad)


def supported(qi, ki, *, block_size: int, kv_major: bool = False) -> bool:
  """ki: [batch, S, heads, r] (whole sequence) or, kv_major, [batch, heads, T, r]."""
  if qi.ndim != 4 or ki.ndim != 4:
    return False
  b, s, h, r = qi.shape
  t = ki.shape[2] if kv_major else ki.shape[1]
  heads = ki.shape[1] if kv_major else ki.shape[2]
  return (ki.shape[0] == b and heads == h and ki.shape[-1] == r and s % block_size == 0
          and t % block_size == 0 and common.is_pow2(block_size) and 16 <= block_size <= 128
          and r <= 64 and t // block_size <= topp_rows.MAX_WIDTH)


def cache_prefill_select(qi, ckeys, lengths, *, q_offset=0, top_p: float,
                         block_size: int = 64, interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.cache_prefill_select`."""
  interpret = common.interpret_flag(interpret)
  b, s, h, _ = qi.shape
  nq, nk = s // block_size, ckeys.shape[2] // block_size
  q_offset = jnp.asarray(q_offset, jnp.int32)
  lengths = jnp.asarray(lengths, jnp.int32)
  pooled, end = pooled_query_blocks(qi, lengths, q_offset, block_size)
  lm = pooled_block_logmass(pooled, ckeys, lengths, q_offset, block_size=block_size,
                            interpret=interpret)
  own = jnp.broadcast_to(((end - 1) // block_size)[:, None, :], (b, h, nq))
  keep = topp_rows.select_rows(lm, own + 1, own, top_p=top_p, interpret=interpret)
  return keep[..., :nk]


def prefill_select(qi, ki, *, top_p: float, block_size: int = 64,
                   interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.prefill_select` (ki: [batch, S, heads, r])."""
  b, s = qi.shape[:2]
  return cache_prefill_select(qi, jnp.swapaxes(ki, 1, 2), jnp.full((b,), s, jnp.int32),
                              q_offset=0, top_p=top_p, block_size=block_size,
                              interpret=interpret)
