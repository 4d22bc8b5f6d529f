"""Indexer-sparse prefill on TPU: block-sparse causal flash attention, Pallas / Mosaic.

Semantics: `reference.sparse_prefill`. Query block i (of `block_size` queries) reads the key
blocks j with `block_mask[..., i, j]`, causally (key <= query), exactly.

A grid step `(batch, q_head, query tile)` covers `rows = q_tile // block_size` query blocks.
Its key blocks are the union of those rows' selections (causal: j <= row), one list per tile:
  list = [count, entry_0, entry_1, ...],  entry = block_index | row_bits << ROW_SHIFT
(bit r: query block r of the tile selected the key block), ascending, padded by repeating
the last entry. The list row arrives in SMEM through its BlockSpec; the key blocks are then
gathered from HBM by hand: an inner loop over ceil(count / blocks_per_iter) iterations (a
*dynamic* trip count, so work follows the selection, not the sequence length) with a
two-slot VMEM buffer: the copies of iteration n + 1 are started before the math of
iteration n. A tile's lists would not fit SMEM as scalar prefetch at long context (one
entry per (tile, key block)), hence the per-step SMEM block. The same gather-loop kernel
serves `sparse_decode(impl="loop")` (q rows = the query heads of a KV-head group).

Layout: activations `[batch, seq, heads * head_dim]` (free reshape), a head = one 128-lane
column block, so `head_dim % 128 == 0`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import reference as _reference
from pallas_kernels.tpu import (LANES, Unsupported, finish_softmax, init_softmax, lane_width_ok,
                                log2, nt_dot, softmax_step)

reference = _reference.sparse_prefill

ROW_SHIFT = 20
MAX_ROWS = 8
BLOCK_MASK = (1 << ROW_SHIFT) - 1


@dataclasses.dataclass(frozen=True)
class GatherPlan:
  """Static shape of the gather-loop kernel (shared with the loop form of sparse decode).

  prefill: q rows are `rows // bs` query blocks of one head; bit r of an entry is query
    block r; query position = tile * rows + row; K/V are `[batch, S, kv_heads * d]`.
  decode: q rows are the query heads of one KV-head group; bit r is head r; every row sits
    at position length - 1; K/V are caches `[batch, kv_heads, T, d]`.
  """

  bs: int
  rows: int  # q rows per grid step
  kpi: int  # key blocks per inner iteration
  slots: int  # list entries after the count
  d: int
  decode: bool = False


def gather_kernel(kvmap_ref, lengths_ref, list_ref, q_ref, k_hbm, v_hbm, o_ref, lse_ref, kbuf,
                  vbuf, sems, m_sc, l_sc, acc_sc, *, plan: GatherPlan, scale: float):
  """Attention of one q tile over the key blocks of its SMEM list, gathered by DMA."""
  bi, u, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv = kvmap_ref[u]
  count = list_ref[0, 0]
  n_iter = (count + plan.kpi - 1) // plan.kpi
  bs, kpi, d = plan.bs, plan.kpi, plan.d

  def copies(it, slot):
    """Async copies of iteration `it`'s key and value blocks into buffer `slot`."""
    out = []
    for r in range(kpi):
      blk = list_ref[0, 1 + it * kpi + r] & BLOCK_MASK
      if plan.decode:
        src = (bi, kv, pl.ds(blk * bs, bs), pl.ds(0, d))
      else:
        src = (bi, pl.ds(blk * bs, bs), pl.ds(kv * d, d))
      dst = (slot, pl.ds(r * bs, bs))
      out.append((pltpu.make_async_copy(k_hbm.at[src], kbuf.at[dst], sems.at[0, slot]),
                  pltpu.make_async_copy(v_hbm.at[src], vbuf.at[dst], sems.at[1, slot])))
    return out

  init_softmax(m_sc, l_sc, acc_sc)

  @pl.when(n_iter > 0)
  def _prefetch():
    for ck, cv in copies(0, 0):
      ck.start()
      cv.start()

  q = q_ref[...]
  shape = (plan.rows, kpi * bs)
  q_row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  shift = log2(bs)
  if plan.decode:
    q_pos = jnp.full(shape, lengths_ref[bi] - 1, jnp.int32)
    bit = q_row  # query head within the group
  else:
    q_pos = t * plan.rows + q_row
    bit = q_row >> shift  # query block within the tile
  lane = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  seg, off = lane >> shift, lane & (bs - 1)

  def body(it, carry):
    slot = it % 2

    @pl.when(it + 1 < n_iter)
    def _next():
      for ck, cv in copies(it + 1, 1 - slot):
        ck.start()
        cv.start()

    cur = copies(it, slot)
    for ck, _ in cur:
      ck.wait()
    s = nt_dot(q, kbuf[slot]) * scale
    key = jnp.zeros(shape, jnp.int32)
    chosen = jnp.zeros(shape, jnp.bool_)
    for r in range(kpi):
      idx = it * kpi + r
      entry = list_ref[0, 1 + idx]
      here = seg == r
      key = jnp.where(here, ((entry & BLOCK_MASK) << shift) + off, key)
      bits = jnp.right_shift(jnp.full(shape, entry >> ROW_SHIFT, jnp.int32), bit) & 1
      chosen = jnp.where(here, (bits == 1) & (idx < count), chosen)
    s = jnp.where(chosen & (key <= q_pos), s, -jnp.inf)

    def load_v():
      for _, cv in cur:
        cv.wait()
      return vbuf[slot]

    softmax_step(s, load_v, m_sc, l_sc, acc_sc)
    return carry

  jax.lax.fori_loop(0, n_iter, body, 0)
  lse = finish_softmax(m_sc, l_sc, acc_sc, o_ref)  # [rows, 128], lanes replicated
  # Prefill: one lane-dense row per tile; decode: the replicated rows as they are.
  lse_ref[...] = lse if plan.decode else jnp.transpose(lse)[:1]


def gather_call(plan: GatherPlan, grid, kvmap, lengths, lists, q, k, v, *, q_spec, o_spec,
                lse_spec, out_shape, interpret, name):
  """pallas_call of `gather_kernel`. lists: int32 [batch, units, tiles, 1, 1 + slots]."""
  return pl.pallas_call(
      functools.partial(gather_kernel, plan=plan, scale=1.0 / math.sqrt(plan.d)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=grid,
          in_specs=[pl.BlockSpec((None, None, None, 1, 1 + plan.slots),
                                 lambda bi, u, t, *_: (bi, u, t, 0, 0),
                                 memory_space=pltpu.SMEM),
                    q_spec,
                    pl.BlockSpec(memory_space=pl.ANY),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=[o_spec, lse_spec],
          scratch_shapes=[pltpu.VMEM((2, plan.kpi * plan.bs, plan.d), k.dtype),
                          pltpu.VMEM((2, plan.kpi * plan.bs, plan.d), v.dtype),
                          pltpu.SemaphoreType.DMA((2, 2)),
                          pltpu.VMEM((plan.rows, LANES), jnp.float32),
                          pltpu.VMEM((plan.rows, LANES), jnp.float32),
                          pltpu.VMEM((plan.rows, plan.d), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
      name=name,
  )(kvmap, lengths, lists, q, k, v)


def tile_lists(block_mask, *, rows: int, slots: int):
  """Per (batch, head, query tile): [count, entries...] with row bits, padded.

  block_mask: bool [batch, heads, nb, nb] (nb % rows == 0). Returns int32
  [batch, heads, nb // rows, 1 + slots]. Non-causal selections (key block > query block)
  are dropped.
  """
  b, h, nb, _ = block_mask.shape
  nt = nb // rows
  causal = jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None]
  sel = (block_mask & causal).reshape(b, h, nt, rows, nb)
  bits = jnp.sum(sel.astype(jnp.int32) << jnp.arange(rows, dtype=jnp.int32)[:, None], axis=3)
  union = bits != 0
  order = jnp.argsort(~union, axis=-1, stable=True).astype(jnp.int32)
  if slots > nb:
    order = jnp.pad(order, ((0, 0), (0, 0), (0, 0), (0, slots - nb)))
  order = order[..., :slots]
  count = jnp.minimum(jnp.sum(union, axis=-1, dtype=jnp.int32), slots)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  order = jnp.where(jnp.arange(slots, dtype=jnp.int32) < count[..., None], order, last)
  entries = order | (jnp.take_along_axis(bits, order, axis=-1) << ROW_SHIFT)
  return jnp.concatenate([count[..., None], entries], axis=-1)


def unsupported(q, block_size: int = 64) -> str | None:
  """Why the kernel does not tile q [batch, S, q_heads, head_dim] in blocks of block_size,
  or None."""
  d = q.shape[-1]
  if block_size % 16 or block_size & (block_size - 1):
    return f"sparse_prefill: block_size={block_size} is not a power of two >= 16"
  if d % LANES:
    return f"head_dim={d}: the TPU kernel needs a multiple of {LANES}"
  return None


@functools.partial(jax.jit, static_argnames=("kv_heads", "block_size", "q_tile",
                                             "blocks_per_iter", "interpret"))
def sparse_prefill(q, k, v, kv_heads, block_mask, *, block_size: int = 64, q_tile: int = 256,
                   blocks_per_iter: int = 4, interpret=False):
  """The `reference.sparse_prefill` contract on TPU.

  Args:
    q: [batch, S, q_heads, head_dim]; k, v: [batch, S, kv_heads, head_dim]; S % block_size
      == 0, head_dim % 128 == 0. block_mask: bool [batch, q_heads, S/bs, S/bs].
    q_tile: queries per grid step (a multiple of block_size); blocks_per_iter: key blocks
      per inner iteration.
  Returns: out [batch, S, q_heads, head_dim] (q.dtype), lse [batch, S, q_heads] float32.
  """
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  nb = s // block_size
  if s % block_size or k.shape[:2] != (b, s) or block_mask.shape != (b, hq, nb, nb):
    raise ValueError(f"sparse_prefill: q {q.shape}, k {k.shape}, block_mask "
                     f"{block_mask.shape} do not match (block_size={block_size})")
  if why := unsupported(q, block_size):
    raise Unsupported(why)
  if len(kv_heads) != hq or not all(0 <= x < hkv for x in kv_heads):
    raise ValueError(f"kv_heads={kv_heads} does not map {hq} query heads onto {hkv} KV heads")
  rows = max(1, min(q_tile // block_size, MAX_ROWS, nb))
  if (rows * block_size) % LANES and rows < nb:  # lse rows want 128 lanes (or the full S)
    rows = min(nb, -(-LANES // block_size))
  nb_p = -(-nb // rows) * rows
  if nb_p != nb:  # whole tiles: padded queries read nothing and are sliced off
    pad = (nb_p - nb) * block_size
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    block_mask = jnp.pad(block_mask, ((0, 0), (0, 0), (0, nb_p - nb), (0, nb_p - nb)))
  s_p = nb_p * block_size
  kpi = max(1, min(blocks_per_iter, nb_p))
  while not lane_width_ok(kpi * block_size):  # score rows: < 128 lanes or whole vregs
    kpi += 1
  slots = -(-nb_p // kpi) * kpi
  plan = GatherPlan(bs=block_size, rows=rows * block_size, kpi=kpi, slots=slots, d=d)
  nt = nb_p // rows
  # A unit dim so the per-step SMEM block (1, 1 + slots) spans the array's last two dims.
  lists = tile_lists(block_mask, rows=rows, slots=slots)[:, :, :, None, :]
  bq = plan.rows
  out, lse = gather_call(
      plan, (b, hq, nt), jnp.asarray(kv_heads, jnp.int32), jnp.zeros((b,), jnp.int32), lists,
      q.reshape(b, s_p, hq * d), k.reshape(b, s_p, hkv * d), v.reshape(b, s_p, hkv * d),
      q_spec=pl.BlockSpec((None, bq, d), lambda bi, h, t, *_: (bi, t, h)),
      o_spec=pl.BlockSpec((None, bq, d), lambda bi, h, t, *_: (bi, t, h)),
      lse_spec=pl.BlockSpec((None, None, 1, bq), lambda bi, h, t, *_: (bi, h, 0, t)),
      out_shape=[jax.ShapeDtypeStruct((b, s_p, hq * d), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, 1, s_p), jnp.float32)],
      interpret=interpret, name="rtpurbo_sparse_prefill")
  out = out.reshape(b, s_p, hq, d)[:, :s]
  lse = jnp.transpose(lse[:, :, 0, :s], (0, 2, 1))
  return out, lse
