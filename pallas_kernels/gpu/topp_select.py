"""Decode selection: score compressed keys per block, block log-sum-exp, then top-p.

Two passes:
  1. `block_logmass` kernel, grid (key chunks, heads, batch): each program reads
     `chunk_blocks` blocks of compressed keys [block_size, r] (read once, memory-bound),
     scores them against the head's indexer query in fp32 (no tensor cores: r is small
     and the reference is exact fp32) and writes each block's log-sum-exp over keys
     < length (-inf for a block without such keys).
  2. `topp_rows.select_rows` over [batch * heads, n_blocks]: exact top-p or histogram.

Shapes: qi [batch, r_heads, r]; ckeys [batch, r_heads, T, r] (T % block_size == 0);
lengths [batch]. Returns bool [batch, r_heads, T // block_size].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu import common, topp_rows
from pallas_kernels.reference import topp_select as reference

__all__ = ["topp_select", "block_logmass", "supported", "reference"]


def _lse_kernel(qi_ref, ck_ref, len_ref, lm_ref, *, bs, cb, nb):
  c, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = len_ref[b]
  qi = qi_ref[b, h, :].astype(jnp.float32)  # [r]
  t0 = c * (cb * bs)
  rows = t0 + jax.lax.broadcasted_iota(jnp.int32, (cb * bs,), 0)
  inside = rows < nb * bs
  keys = plgpu.load(ck_ref.at[b, h, pl.ds(t0, cb * bs), :], mask=inside[:, None], other=0.0)
  s = jnp.sum(keys.astype(jnp.float32) * qi[None, :], axis=1)  # [cb * bs]
  s = jnp.where(rows < length, s, common.NEG_INF).reshape(cb, bs)
  m = jnp.max(s, axis=1)
  m_safe = jnp.where(m == common.NEG_INF, 0.0, m)
  tot = jnp.sum(jnp.exp(s - m_safe[:, None]), axis=1)
  lse = jnp.where(tot > 0.0, jnp.log(jnp.where(tot > 0.0, tot, 1.0)) + m_safe, common.NEG_INF)
  blk = c * cb + jax.lax.broadcasted_iota(jnp.int32, (cb,), 0)
  plgpu.store(lm_ref.at[b, h, pl.ds(c * cb, cb)], lse, mask=blk < nb)


@functools.partial(jax.jit, static_argnames=("block_size", "chunk_blocks", "interpret"))
def block_logmass(qi, ckeys, lengths, *, block_size: int = 64, chunk_blocks: int = 32,
                  interpret: bool = False):
  """[batch, r_heads, T // block_size] f32 block log-sum-exp of the indexer scores."""
  b, h, t, _ = ckeys.shape
  nb = t // block_size
  cb = min(chunk_blocks, common.next_pow2(nb))
  return pl.pallas_call(
      functools.partial(_lse_kernel, bs=block_size, cb=cb, nb=nb),
      grid=(common.cdiv(nb, cb), h, b),
      in_specs=[common.full_spec()] * 3,
      out_specs=common.full_spec(),
      out_shape=jax.ShapeDtypeStruct((b, h, nb), jnp.float32),
      compiler_params=common.params(8 if cb * block_size >= 2048 else 4, 1),
      interpret=interpret,
      name="topp_block_logmass",
  )(qi, ckeys, lengths.astype(jnp.int32))


def supported(qi, ckeys, lengths, *, block_size: int) -> bool:
  if ckeys.ndim != 4 or qi.shape != (ckeys.shape[0], ckeys.shape[1], ckeys.shape[3]):
    return False
  t, r = ckeys.shape[2], ckeys.shape[3]
  return (t % block_size == 0 and common.is_pow2(block_size) and common.is_pow2(r)
          and t // block_size <= topp_rows.MAX_WIDTH
          and lengths.shape == (ckeys.shape[0],))


def topp_select(qi, ckeys, lengths, *, top_p: float, block_size: int = 64,
                selector: str = "exact", block_offset=None, interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.topp_select`. A `block_offset` (the
  indexer's distance bias, [batch, r_heads, nb]) is one XLA add between the two passes."""
  interpret = common.interpret_flag(interpret)
  lengths = lengths.astype(jnp.int32)
  lm = block_logmass(qi, ckeys, lengths, block_size=block_size, interpret=interpret)
  if block_offset is not None:
    lm = lm + block_offset.astype(jnp.float32)  # -inf (no visible key) stays -inf
  return topp_rows.select_rows_decode(lm, lengths, block_size=block_size, top_p=top_p,
                                      selector=selector, interpret=interpret)
