"""Sparse-prefill selection: pooled indexer queries vs every causal key block, then top-p.

Definition (the reference's): query block i is represented by the mean of its indexer
queries; key block j gets the exact log-sum-exp of that pooled query's scores over the
block's keys (fp32), for j <= i. Top-p per query block over those log-masses.

Pass 1, kernel `pooled_block_logmass`, grid (query tiles, key tiles, batch * heads): a
program owns a [QT query blocks, KT key blocks] tile of the log-mass matrix, walks its KT
key blocks (one [block_size, r] load each, scored against all QT pooled queries by one
fp32 dot), reduces each to a log-sum-exp column and writes the tile once. Tiles entirely
above the causal diagonal return at once (their entries are never read).
Pass 2: `topp_rows.select_rows` with n_valid = i + 1 and own block i.

Shapes: qi, ki [batch, S, r_heads, r] (S % block_size == 0).
Returns bool [batch, r_heads, S // block_size, S // block_size].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gpu import common, topp_rows
from pallas_kernels.reference import prefill_select as reference

__all__ = ["prefill_select", "pooled_block_logmass", "supported", "reference"]


def _kernel(pooled_ref, ki_ref, lm_ref, *, bs, qt, kt, heads, precision):
  iq, ik, bh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b, h = bh // heads, bh % heads

  @pl.when(ik * kt <= iq * qt + qt - 1)
  def _():
    pooled = pooled_ref[bh, pl.ds(iq * qt, qt), :]  # [qt, r] f32
    col = jax.lax.broadcasted_iota(jnp.int32, (qt, kt), 1)

    def body(jj, tile):
      j = ik * kt + jj
      keys = ki_ref[b, pl.ds(j * bs, bs), h, :].astype(jnp.float32)  # [bs, r]
      s = common.dot_nt(pooled, keys, precision)  # [qt, bs]
      m = jnp.max(s, axis=1)
      lse = jnp.log(jnp.sum(jnp.exp(s - m[:, None]), axis=1)) + m
      return jnp.where(col == jj, lse[:, None], tile)

    tile = jax.lax.fori_loop(0, kt, body, jnp.zeros((qt, kt), jnp.float32))
    qi_idx = iq * qt + jax.lax.broadcasted_iota(jnp.int32, (qt, kt), 0)
    tile = jnp.where(ik * kt + col <= qi_idx, tile, common.NEG_INF)
    lm_ref[bh, pl.ds(iq * qt, qt), pl.ds(ik * kt, kt)] = tile


@functools.partial(jax.jit, static_argnames=("block_size", "tile", "interpret"))
def pooled_block_logmass(qi, ki, *, block_size: int = 64, tile: int = 64,
                         interpret: bool = False):
  """[batch, r_heads, nb, nb] f32 log-masses (entries above the diagonal unspecified)."""
  b, s, h, r = qi.shape
  nb = s // block_size
  r_pad = max(16, common.next_pow2(r))
  pooled = qi.astype(jnp.float32).reshape(b, nb, block_size, h, r).mean(axis=2)
  pooled = jnp.transpose(pooled, (0, 2, 1, 3)).reshape(b * h, nb, r)
  if r_pad != r:  # the fp32 dot needs K >= 16; zero columns change no score
    pooled = jnp.pad(pooled, ((0, 0), (0, 0), (0, r_pad - r)))
    ki = jnp.pad(ki, ((0, 0), (0, 0), (0, 0), (0, r_pad - r)))
  t = min(tile, max(16, common.next_pow2(nb)))
  nb_pad = common.cdiv(nb, t) * t
  if nb_pad != nb:
    pooled = jnp.pad(pooled, ((0, 0), (0, nb_pad - nb), (0, 0)))
    ki = jnp.pad(ki, ((0, 0), (0, (nb_pad - nb) * block_size), (0, 0), (0, 0)))
  lm = pl.pallas_call(
      functools.partial(_kernel, bs=block_size, qt=t, kt=t, heads=h,
                        precision=jax.lax.Precision.HIGHEST),
      grid=(nb_pad // t, nb_pad // t, b * h),
      in_specs=[common.full_spec()] * 2,
      out_specs=common.full_spec(),
      out_shape=jax.ShapeDtypeStruct((b * h, nb_pad, nb_pad), jnp.float32),
      compiler_params=common.params(4, 2),
      interpret=interpret,
      name="pooled_block_logmass",
  )(pooled, ki)
  return lm[:, :nb, :nb].reshape(b, h, nb, nb)


def supported(qi, ki, *, block_size: int) -> bool:
  return (qi.ndim == 4 and qi.shape == ki.shape and qi.shape[1] % block_size == 0
          and common.is_pow2(block_size) and 16 <= block_size <= 128
          and qi.shape[-1] <= 64
          and qi.shape[1] // block_size <= topp_rows.MAX_WIDTH)


def prefill_select(qi, ki, *, top_p: float, block_size: int = 64,
                   interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.prefill_select`."""
  interpret = common.interpret_flag(interpret)
  b, s, h, _ = qi.shape
  nb = s // block_size
  lm = pooled_block_logmass(qi, ki, block_size=block_size, interpret=interpret)
  own = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, h, nb))
  return topp_rows.select_rows(lm, own + 1, own, top_p=top_p, interpret=interpret)
