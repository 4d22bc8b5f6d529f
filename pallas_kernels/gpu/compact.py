"""Row compaction: a boolean block mask -> ascending block lists + counts.

Sparse attention kernels walk a list of block indices rather than a mask. For each row
of `mask [rows, n]`, the kernel writes a permutation of 0..n-1 that puts the selected
blocks first (ascending) and the others after them (ascending), plus the number selected.
One program per row; the row lives in registers (n <= MAX_WIDTH), a cumulative sum gives
each element its destination and one scatter store writes the whole row, so every element
of the output is written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu import common

MAX_WIDTH = 32768

__all__ = ["compact_rows", "reference", "MAX_WIDTH"]


def reference(mask):
  """jnp oracle: (lists [rows, n] int32, counts [rows] int32) as described above."""
  order = jnp.argsort(~mask.astype(bool), axis=-1, stable=True)
  return order.astype(jnp.int32), jnp.sum(mask.astype(bool), axis=-1, dtype=jnp.int32)


def _kernel(mask_ref, list_ref, count_ref, *, n, width):
  r = pl.program_id(0)
  idx = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
  inside = idx < n
  sel = plgpu.load(mask_ref.at[r, pl.ds(0, width)], mask=inside, other=0) != 0
  sel_i = sel.astype(jnp.int32)
  count = jnp.sum(sel_i)
  before_sel = jnp.cumsum(sel_i) - sel_i
  before_rest = idx - before_sel  # unselected elements ahead of this one
  dest = jnp.where(sel, before_sel, count + before_rest)
  plgpu.store(list_ref.at[r, dest], idx, mask=inside)
  count_ref[r] = count


def _warps(width: int) -> int:
  return int(min(16, max(4, width // 1024)))


@functools.partial(jax.jit, static_argnames=("interpret",))
def _compact(mask, *, interpret):
  rows, n = mask.shape
  width = common.next_pow2(n)
  return pl.pallas_call(
      functools.partial(_kernel, n=n, width=width),
      grid=(rows,),
      in_specs=[common.full_spec()],
      out_specs=[common.full_spec()] * 2,
      out_shape=[jax.ShapeDtypeStruct((rows, n), jnp.int32),
                 jax.ShapeDtypeStruct((rows,), jnp.int32)],
      compiler_params=common.params(_warps(width), 1),
      interpret=interpret,
      name="compact_rows",
  )(mask.astype(jnp.int8))


def compact_rows(mask, *, interpret: bool | None = None):
  """mask [..., n] bool -> (lists [..., n] int32, counts [...] int32). n <= MAX_WIDTH."""
  *lead, n = mask.shape
  if n > MAX_WIDTH:
    raise ValueError(f"compact_rows: row width {n} exceeds {MAX_WIDTH}")
  lists, counts = _compact(mask.reshape(-1, n), interpret=common.interpret_flag(interpret))
  return lists.reshape(*lead, n), counts.reshape(lead)
