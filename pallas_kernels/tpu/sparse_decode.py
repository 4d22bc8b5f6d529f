"""Sparse decode attention on TPU over the selected key blocks: Pallas / Mosaic.

Semantics: `reference.sparse_decode`. One new query per (batch, retrieval head) attends,
exactly (full head_dim, 1/sqrt(d)), to the keys `j < length` of the blocks its mask selects.

GQA-aware: query heads are grouped by the KV head they read (at most `MAX_GROUP` per
group; a larger group is split). A grid step serves a whole group: it fetches a key block
once and scores it for every query head of the group, each head masked to its own
selection. The group reads the *union* of its heads' selections.

Block lists live in SMEM (`PrefetchScalarGridSpec`), one padded list per (batch, group):
  entry = block_index | head_bits << HEAD_SHIFT   (bit g: query head g of the group
  selected the block), ascending, `count` real entries, then the last entry repeated.
The grid is `(batch, groups, steps)` with `blocks_per_step` key blocks per step: the K and
V caches are passed `blocks_per_step` times, each with an index map reading its own slot
of the list, so one step gathers several non-contiguous blocks through the ordinary
double-buffered pipeline. Padded slots repeat the last block index, so the pipeline skips
their copy, and steps past the count do no math.

`impl="loop"` runs the same lists through the gather-loop kernel of `sparse_prefill`
instead: one grid step per (batch, group), the list row in SMEM, and an inner loop with a
dynamic trip count that gathers the blocks by double-buffered DMA. Its cost follows the
number of selected blocks rather than the cache length (the pipelined grid always has
T / (block_size * blocks_per_step) steps, most of them empty at low density); which is
faster on a given chip is for `benchmarks/kernels_tpu.py` to say.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import reference as _reference
from pallas_kernels.tpu import (LANES, Unsupported, finish_softmax, init_softmax, lane_width_ok,
                                log2, nt_dot, softmax_step)
from pallas_kernels.tpu import sparse_prefill as _gather
from pallas_kernels.tpu.sparse_prefill import GatherPlan, gather_call

reference = _reference.sparse_decode

HEAD_SHIFT = _gather.ROW_SHIFT  # block indices below 2**20 (64M tokens at block 64)
MAX_GROUP = 8  # head bits 20..27 of an int32 entry
BLOCK_MASK = (1 << HEAD_SHIFT) - 1
SMEM_ENTRIES = 1 << 15  # list entries per call (128 KiB of SMEM); larger batches are split


def gqa_groups(kv_heads: tuple[int, ...], max_group: int = MAX_GROUP):
  """Static grouping: ((kv_head, (query heads...)), ...), each group <= max_group heads."""
  by_kv: dict[int, list[int]] = {}
  for h, kv in enumerate(kv_heads):
    by_kv.setdefault(kv, []).append(h)
  groups = []
  for kv in sorted(by_kv):
    heads = by_kv[kv]
    for i in range(0, len(heads), max_group):
      groups.append((kv, tuple(heads[i:i + max_group])))
  return tuple(groups)


@dataclasses.dataclass(frozen=True)
class _Plan:
  n_groups: int
  group: int  # G, padded heads per group
  bs: int
  bps: int  # key blocks per grid step
  steps: int
  batch_offset: int  # first cache row of this call (large batches run in pieces)

  @property
  def slots(self):
    return self.steps * self.bps


def _kernel(kvmap_ref, lists_ref, counts_ref, lengths_ref, q_ref, *refs, plan: _Plan,
            scale: float):
  k_refs, v_refs = refs[:plan.bps], refs[plan.bps:2 * plan.bps]
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[2 * plan.bps:]
  del kvmap_ref
  bi, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row = bi * plan.n_groups + g
  count = counts_ref[row]
  length = lengths_ref[bi]

  @pl.when(i == 0)
  def _init():
    init_softmax(m_sc, l_sc, acc_sc)

  @pl.when(i * plan.bps < count)
  def _step():
    k = jnp.concatenate([r[...] for r in k_refs], axis=0)  # [bps * bs, d]
    s = nt_dot(q_ref[...], k) * scale  # [G, bps * bs]
    lane = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    head = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    shift = log2(plan.bs)
    seg, off = lane >> shift, lane & (plan.bs - 1)
    key = jnp.zeros(s.shape, jnp.int32)
    chosen = jnp.zeros(s.shape, jnp.bool_)
    for r in range(plan.bps):
      slot = i * plan.bps + r
      entry = lists_ref[row * plan.slots + slot]
      here = seg == r
      key = jnp.where(here, ((entry & BLOCK_MASK) << shift) + off, key)
      bits = jnp.right_shift(jnp.full(s.shape, entry >> HEAD_SHIFT, jnp.int32), head) & 1
      chosen = jnp.where(here, (bits == 1) & (slot < count), chosen)
    s = jnp.where(chosen & (key < length), s, -jnp.inf)
    softmax_step(s, lambda: jnp.concatenate([r[...] for r in v_refs], axis=0), m_sc, l_sc,
                 acc_sc)

  @pl.when(i == plan.steps - 1)
  def _finish():
    lse_ref[...] = finish_softmax(m_sc, l_sc, acc_sc, o_ref)


def _members(groups, hq: int) -> np.ndarray:
  """[groups, G] query head of each group member; hq (a dummy) pads short groups."""
  members = np.full((len(groups), max(len(hs) for _, hs in groups)), hq, np.int32)
  for gi, (_, hs) in enumerate(groups):
    members[gi, :len(hs)] = hs
  return members


def group_lists(block_mask, lengths, groups, *, block_size: int, slots: int):
  """Per (batch, group): the union block list with head bits, padded, and its count.

  block_mask: bool [batch, q_heads, nb]. Returns lists int32 [batch, groups, slots] and
  counts int32 [batch, groups]. Blocks starting at or past `lengths` are dropped.
  """
  b, hq, nb = block_mask.shape
  members = _members(groups, hq)
  g_max = members.shape[1]
  padded = jnp.pad(block_mask, ((0, 0), (0, 1), (0, 0)))
  in_range = jnp.arange(nb, dtype=jnp.int32)[None, :] * block_size < lengths[:, None]
  sel = padded[:, members] & in_range[:, None, None, :]  # [b, groups, G, nb]
  bits = jnp.sum(sel.astype(jnp.int32) << jnp.arange(g_max, dtype=jnp.int32)[:, None], axis=2)
  union = bits != 0
  # The list itself: selected blocks ascending, padding repeats the last one.
  order = jnp.argsort(~union, axis=-1, stable=True).astype(jnp.int32)
  if slots > nb:
    order = jnp.pad(order, ((0, 0), (0, 0), (0, slots - nb)))
  order = order[..., :slots]
  count = jnp.minimum(jnp.sum(union, axis=-1, dtype=jnp.int32), slots)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  order = jnp.where(jnp.arange(slots, dtype=jnp.int32) < count[..., None], order, last)
  entries = order | (jnp.take_along_axis(bits, order, axis=-1) << HEAD_SHIFT)
  return entries, count


def unsupported(q, k_cache, block_size: int = 64) -> str | None:
  """Why the kernel does not tile q [batch, q_heads, head_dim] over k_cache [batch, kv_heads,
  T, head_dim] in blocks of block_size, or None."""
  nb, d = k_cache.shape[2] // block_size, q.shape[-1]
  if block_size % 16 or block_size & (block_size - 1):
    return f"sparse_decode: block_size={block_size} is not a power of two >= 16"
  if nb > BLOCK_MASK:
    return f"sparse_decode: {nb} blocks exceed the list encoding ({BLOCK_MASK})"
  if not lane_width_ok(d):  # the output rows: < 128 lanes or whole vregs
    return f"sparse_decode: head_dim={d} is neither < {LANES} nor a multiple of {LANES}"
  return None


@functools.partial(jax.jit, static_argnames=("kv_heads", "block_size", "blocks_per_step",
                                             "impl", "interpret"))
def sparse_decode(q, k_cache, v_cache, kv_heads, block_mask, lengths, *, block_size: int = 64,
                  blocks_per_step: int = 8, impl: str = "pipeline", interpret=False):
  """The `reference.sparse_decode` contract on TPU.

  Args:
    q: [batch, q_heads, head_dim]; k_cache, v_cache: [batch, kv_heads, T, head_dim] with
      T % block_size == 0; kv_heads: static tuple; block_mask: bool [batch, q_heads,
      T // block_size]; lengths: [batch] int32.
    blocks_per_step: key blocks gathered per grid step (per inner iteration for "loop").
    impl: "pipeline" (BlockSpec gathers, fixed grid) or "loop" (DMA loop, dynamic count).
  Returns: out [batch, q_heads, head_dim] (q.dtype), lse [batch, q_heads] float32.
  """
  b, hq, d = q.shape
  _, hkv, t, _ = k_cache.shape
  nb = t // block_size
  if t % block_size or block_mask.shape != (b, hq, nb) or lengths.shape != (b,):
    raise ValueError(f"sparse_decode: q {q.shape}, cache {k_cache.shape}, block_mask "
                     f"{block_mask.shape}, lengths {lengths.shape} do not match "
                     f"(block_size={block_size})")
  if len(kv_heads) != hq or not all(0 <= h < hkv for h in kv_heads):
    raise ValueError(f"kv_heads={kv_heads} does not map {hq} query heads onto {hkv} KV heads")
  if why := unsupported(q, k_cache, block_size):
    raise Unsupported(why)
  if impl not in ("pipeline", "loop"):
    raise ValueError(f"impl={impl!r}: expected 'pipeline' or 'loop'")
  groups = gqa_groups(tuple(kv_heads))
  members = _members(groups, hq)
  ng, g_max = members.shape
  bps = max(1, min(blocks_per_step, nb))
  while not lane_width_ok(bps * block_size):  # score rows: < 128 lanes or whole vregs
    bps += 1
  steps = -(-nb // bps)
  lengths = lengths.astype(jnp.int32)
  lists, counts = group_lists(block_mask, lengths, groups, block_size=block_size,
                              slots=steps * bps)
  qg = jnp.pad(q, ((0, 0), (0, 1), (0, 0)))[:, members]  # [b, groups, G, d]
  kvmap = jnp.asarray([kv for kv, _ in groups], jnp.int32)
  if impl == "loop":
    out, lse = _loop(qg, k_cache, v_cache, kvmap, lists, counts, lengths, block_size, bps,
                     interpret)
  else:
    out, lse = _pipeline(qg, k_cache, v_cache, kvmap, lists, counts, lengths, block_size, bps,
                         steps, interpret)
  # Scatter the groups back to query-head order.
  where = np.zeros((hq, 2), np.int32)
  for gi, (_, hs) in enumerate(groups):
    for m, h in enumerate(hs):
      where[h] = (gi, m)
  return out[:, where[:, 0], where[:, 1]], lse[:, where[:, 0], where[:, 1]]


def _loop(qg, k_cache, v_cache, kvmap, lists, counts, lengths, block_size, bps, interpret):
  """Gather-loop form: grid (batch, groups), list row [count, entries...] in SMEM."""
  b, ng, g_max, d = qg.shape
  plan = GatherPlan(bs=block_size, rows=g_max, kpi=bps, slots=lists.shape[-1], d=d,
                    decode=True)
  rows = jnp.concatenate([counts[..., None], lists], axis=-1)[:, :, None, None, :]
  group = pl.BlockSpec((None, None, g_max, d), lambda bi, g, t, *_: (bi, g, 0, 0))
  out, lse = gather_call(
      plan, (b, ng, 1), kvmap, lengths, rows, qg, k_cache, v_cache, q_spec=group,
      o_spec=group,
      lse_spec=pl.BlockSpec((None, None, g_max, LANES), lambda bi, g, t, *_: (bi, g, 0, 0)),
      out_shape=[jax.ShapeDtypeStruct(qg.shape, qg.dtype),
                 jax.ShapeDtypeStruct((b, ng, g_max, LANES), jnp.float32)],
      interpret=interpret, name="rtpurbo_sparse_decode_loop")
  return out, lse[..., 0]


def _pipeline(qg, k_cache, v_cache, kvmap, lists, counts, lengths, block_size, bps, steps,
              interpret):
  """BlockSpec form: grid (batch, groups, steps), lists in SMEM as scalar prefetch."""
  b, ng, g_max, d = qg.shape
  # Batch rows per call so that one call's lists fit the SMEM budget.
  rows = max(1, min(b, SMEM_ENTRIES // max(1, ng * steps * bps)))
  outs, lses = [], []
  for b0 in range(0, b, rows):
    nrow = min(rows, b - b0)
    plan = _Plan(n_groups=ng, group=g_max, bs=block_size, bps=bps, steps=steps,
                 batch_offset=b0)

    def kv_spec(r, plan=plan):
      def index(bi, g, i, kvmap_ref, lists_ref, counts_ref, lengths_ref):
        row = bi * plan.n_groups + g
        entry = lists_ref[row * plan.slots + i * plan.bps + r]
        return bi + plan.batch_offset, kvmap_ref[g], entry & BLOCK_MASK, 0
      return pl.BlockSpec((None, None, block_size, d), index)

    def group_map(bi, g, i, *_):
      return bi, g, 0, 0

    out, lse = pl.pallas_call(
        functools.partial(_kernel, plan=plan, scale=1.0 / math.sqrt(d)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(nrow, ng, steps),
            in_specs=([pl.BlockSpec((None, None, g_max, d), group_map)]
                      + [kv_spec(r) for r in range(bps)] + [kv_spec(r) for r in range(bps)]),
            out_specs=[pl.BlockSpec((None, None, g_max, d), group_map),
                       pl.BlockSpec((None, None, g_max, LANES), group_map)],
            scratch_shapes=[pltpu.VMEM((g_max, LANES), jnp.float32),
                            pltpu.VMEM((g_max, LANES), jnp.float32),
                            pltpu.VMEM((g_max, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((nrow, ng, g_max, d), qg.dtype),
                   jax.ShapeDtypeStruct((nrow, ng, g_max, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="rtpurbo_sparse_decode",
    )(kvmap, lists[b0:b0 + nrow].reshape(-1), counts[b0:b0 + nrow].reshape(-1),
      lengths[b0:b0 + nrow], qg[b0:b0 + nrow], *([k_cache] * bps), *([v_cache] * bps))
    outs.append(out)
    lses.append(lse[..., 0])
  out = jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
  lse = jnp.concatenate(lses, axis=0) if len(lses) > 1 else lses[0]
  return out, lse
