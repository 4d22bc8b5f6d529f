"""Decode attention over lists of key blocks, split-KV, GQA-grouped.

One kernel serves both decode operations:
  sparse_decode  retrieval heads read the blocks their block mask selects;
  ring_decode    local heads read the blocks of a ring buffer (or of the full cache) that
                 hold at least one key visible under the sink + window rule.

Query heads are grouped by KV head; a group's rows are padded to `G_pad >= 16` (the
smallest tensor-core tile) and attend together, so K/V blocks are read once per group.
Each group walks an ascending list of block indices (`compact.compact_rows` of a mask);
for sparse decode the list is the union over the group's heads and a per-block bit mask
says which heads selected it. The list is cut into `n_splits` equal slices (split-KV: the
slice length follows the dynamic count, so work spreads over the GPU whatever the
density); each program writes a partial (out, lse) and one `decode_merge` program per
group combines them straight into query-head order. Group tables (KV head, member heads)
are static and looked up inside the kernels, so XLA launches nothing to build them.

Key visibility inside a block: position kpos (contiguous 0.. with `lengths`, or read from
`k_pos`), 0 <= kpos <= q_pos, and for the local rule kpos < sinks or kpos > q_pos - window
(or `sparse_active` False).

Shapes: q [batch, q_heads, head_dim]; caches [batch, kv_heads, T, head_dim].
Returns out [batch, q_heads, head_dim] (q.dtype), lse [batch, q_heads] f32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu import common, compact
from pallas_kernels.reference import ring_decode as reference_ring
from pallas_kernels.reference import sparse_decode as reference

__all__ = ["sparse_decode", "ring_decode", "block_decode", "group_lists", "supported",
           "reference", "reference_ring"]

TARGET_PROGRAMS = 528  # about 4 programs per multiprocessor of an H100/H200


def attend_block(carry, q, k_ref, v_ref, b, kv, k0, inside, vis, c, precision):
  """One online-softmax update of the query rows q [G_pad, d] with the keys k0..k0+bk of
  k_ref / v_ref [batch, kv_heads, T, d] at (b, kv); inside [bk]: rows below T; vis
  [G_pad, bk]; c: the score scale in base 2."""
  bk = inside.shape[0]
  k = plgpu.load(k_ref.at[b, kv, pl.ds(k0, bk), :], mask=inside[:, None], other=0.0)
  v = plgpu.load(v_ref.at[b, kv, pl.ds(k0, bk), :], mask=inside[:, None], other=0.0)
  s2 = common.dot_nt(q, k, precision) * c  # [G_pad, bk]
  return common.online_softmax_step(carry, s2, v, vis, precision)


def group_queries(q_ref, b, g, members, g_pad):
  """The query rows of group g, gathered from q_ref [batch, q_heads, d]: [g_pad, d], padding
  rows zero (members[g]: static query-head indices of the group)."""
  row = jax.lax.broadcasted_iota(jnp.int32, (g_pad,), 0)
  row_ok = row < common.static_lookup(g, tuple(len(m) for m in members))
  q = q_ref[b, common.static_rows(g, members, g_pad), :]
  return jnp.where(row_ok[:, None], q, jnp.zeros((), q.dtype))


def store_partial(o_ref, lse_ref, carry, b, g, s_id, g_pad, g_store):
  """Write a split's (out, lse) of its group's first g_store rows (the real heads)."""
  out, lse = common.finish_softmax(*carry)
  keep = jax.lax.broadcasted_iota(jnp.int32, (g_pad,), 0) < g_store
  plgpu.store(o_ref.at[b, g, s_id, pl.ds(0, g_pad), :], out, mask=keep[:, None])
  plgpu.store(lse_ref.at[b, g, s_id, pl.ds(0, g_pad)], lse, mask=keep)


def _kernel(q_ref, k_ref, v_ref, list_ref, count_ref, bits_ref, kpos_ref, qpos_ref,
            active_ref, o_ref, lse_ref, *, kv_ids, members, bk, t, n_splits, sinks, window,
            shared_list, g_pad, g_store, scale, precision):
  s_id, g, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv = common.static_lookup(g, kv_ids)
  lg = 0 if shared_list else g
  q = group_queries(q_ref, b, g, members, g_pad)
  gp, d = q.shape
  qpos = qpos_ref[b]
  active = True if active_ref is None else active_ref[b] != 0
  count = count_ref[b, lg]
  per = (count + n_splits - 1) // n_splits
  start = jnp.minimum(s_id * per, count)
  stop = jnp.minimum(start + per, count)
  c = scale * common.LOG2E
  lane = jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
  head = jax.lax.broadcasted_iota(jnp.int32, (gp,), 0)

  def body(slot, carry):
    blk = list_ref[b, lg, slot]
    k0 = blk * bk
    rows = k0 + lane
    inside = rows < t
    if kpos_ref is None:
      kpos = rows
    else:
      kpos = plgpu.load(kpos_ref.at[b, pl.ds(k0, bk)], mask=inside, other=-1)
    vis = inside & (kpos >= 0) & (kpos <= qpos)
    if window is not None:
      vis &= (kpos < sinks) | (kpos > qpos - window) | jnp.logical_not(active)
    vis2 = jnp.broadcast_to(vis[None, :], (gp, bk))
    if bits_ref is not None:
      bits = bits_ref[b, g, blk]
      vis2 &= (((bits >> head) & 1) != 0)[:, None]
    return attend_block(carry, q, k_ref, v_ref, b, kv, k0, inside, vis2, c, precision)

  carry = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), common.NEG_INF, jnp.float32),
           jnp.zeros((gp,), jnp.float32))
  carry = jax.lax.fori_loop(start, stop, body, carry)
  store_partial(o_ref, lse_ref, carry, b, g, s_id, g_pad, g_store)


def _merge_kernel(o_ref, lse_ref, out_ref, lse_out_ref, *, members, n_splits, s_pad, g_store):
  """Combine the split partials of one group (all its member heads) into head order."""
  g, b = pl.program_id(0), pl.program_id(1)
  split = jax.lax.broadcasted_iota(jnp.int32, (s_pad,), 0)
  ok = split < n_splits
  size = common.static_lookup(g, tuple(len(m) for m in members))
  for i in range(g_store):  # member i of the group (if the group has one)
    head = common.static_lookup(g, tuple(m[min(i, len(m) - 1)] for m in members))

    @pl.when(i < size)
    def _():
      m = jnp.int32(i)
      lse = plgpu.load(lse_ref.at[b, g, pl.ds(0, s_pad), m], mask=ok, other=common.NEG_INF)
      o = plgpu.load(o_ref.at[b, g, pl.ds(0, s_pad), m, :], mask=ok[:, None], other=0.0)
      total = jnp.max(lse)
      safe = jnp.where(total == common.NEG_INF, 0.0, total)
      w = jnp.where(ok, jnp.exp(lse - safe), 0.0)
      den = jnp.sum(w)
      out = jnp.sum(o * w[:, None], axis=0) / jnp.where(den > 0.0, den, 1.0)
      out_ref[b, head, :] = out.astype(out_ref.dtype)
      lse_out_ref[b, head] = jnp.where(den > 0.0, jnp.log(jnp.where(den > 0.0, den, 1.0)) + safe,
                                       common.NEG_INF)


MAX_SPLITS = 128  # the merge kernel holds [splits, head_dim] of one head in registers


def split_count(batch: int, groups: int, expected_blocks: int) -> int:
  """Splits per group: fill the GPU, but keep >= 2 expected blocks per split."""
  fill = TARGET_PROGRAMS // max(1, batch * groups)
  return int(max(1, min(MAX_SPLITS, fill, expected_blocks // 2)))


@functools.partial(jax.jit, static_argnames=(
    "kv_ids", "members", "block_size", "sinks", "window", "expected_blocks", "num_warps",
    "num_stages", "interpret"))
def block_decode(q, k_cache, v_cache, lists, counts, head_bits, k_pos, q_pos, active, *,
                 kv_ids, members, block_size, sinks, window, expected_blocks=None,
                 num_warps=4, num_stages=2, interpret=False):
  """Decode over block lists. Grouping (kv_ids, members) from `common.kv_groups`.

  lists [batch, n_groups or 1, L] int32 ascending block indices, counts [batch, n_groups or
  1]; head_bits [batch, n_groups, n_blocks] int32 or None (bit i: group member i selected
  the block); k_pos [batch, T] int32 or None (contiguous positions); q_pos [batch]; active
  [batch] or None (all active). expected_blocks: a sizing hint for the split count only.
  """
  b, hq, d = q.shape
  t = k_cache.shape[2]
  n_groups = len(kv_ids)
  g_store = max(len(m) for m in members)
  g_pad = max(16, common.next_pow2(g_store))  # tensor-core tile rows
  n_splits = split_count(b, n_groups, expected_blocks or lists.shape[-1])
  if interpret:  # the interpreter runs programs one by one: a few splits still test merging
    n_splits = min(n_splits, 3)
  kernel = functools.partial(
      _kernel, kv_ids=kv_ids, members=members, bk=block_size, t=t, n_splits=n_splits,
      sinks=sinks, window=window, shared_list=lists.shape[1] == 1 and n_groups > 1,
      g_pad=g_pad, g_store=g_store, scale=1.0 / math.sqrt(d),
      precision=common.dot_precision(q.dtype))
  args = [q, k_cache, v_cache, lists, counts, head_bits, k_pos, q_pos, active]
  o_part, lse_part = pl.pallas_call(
      kernel,
      grid=(n_splits, n_groups, b),
      in_specs=[None if a is None else common.full_spec() for a in args],
      out_specs=[common.full_spec()] * 2,
      out_shape=[jax.ShapeDtypeStruct((b, n_groups, n_splits, g_store, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, n_groups, n_splits, g_store), jnp.float32)],
      compiler_params=common.params(num_warps, num_stages),
      interpret=interpret,
      name="sparse_decode" if window is None else "ring_decode",
  )(*args)
  return merge_splits(o_part, lse_part, members=members, q_heads=hq, dtype=q.dtype,
                      interpret=interpret)


def merge_splits(o_part, lse_part, *, members, q_heads: int, dtype, interpret: bool):
  """Combine split partials o_part [batch, groups, splits, g_store, d] / lse_part [batch,
  groups, splits, g_store] into out [batch, q_heads, d] (dtype) and lse [batch, q_heads];
  members[g][i] is the output head of row i of group g. Heads of no group are not written."""
  b, n_groups, n_splits, g_store, d = o_part.shape
  s_pad = common.next_pow2(n_splits)
  return pl.pallas_call(
      functools.partial(_merge_kernel, members=members, n_splits=n_splits, s_pad=s_pad,
                        g_store=g_store),
      grid=(n_groups, b),
      in_specs=[common.full_spec()] * 2,
      out_specs=[common.full_spec()] * 2,
      out_shape=[jax.ShapeDtypeStruct((b, q_heads, d), dtype),
                 jax.ShapeDtypeStruct((b, q_heads), jnp.float32)],
      compiler_params=common.params(4 if s_pad <= 64 else 8, 1),
      interpret=interpret,
      name="decode_merge",
  )(o_part, lse_part)


def supported(q, k_cache, v_cache, kv_heads, *, block_size: int) -> bool:
  d = q.shape[-1]
  return (q.ndim == 3 and k_cache.ndim == 4 and k_cache.shape == v_cache.shape
          and k_cache.shape[0] == q.shape[0] and k_cache.shape[-1] == d
          and len(kv_heads) == q.shape[1] and common.is_pow2(d) and 16 <= d <= 256
          and common.is_pow2(block_size) and 16 <= block_size <= 128
          and common.cdiv(k_cache.shape[2], block_size) <= compact.MAX_WIDTH
          and q.dtype == k_cache.dtype == v_cache.dtype
          and q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
          and max(len(m) for m in common.kv_groups(tuple(kv_heads))[1]) <= 31
          and all(0 <= kv < k_cache.shape[1] for kv in kv_heads))


def group_lists(block_mask, members, *, interpret: bool):
  """Per GQA group: the ascending list of blocks any member selected, its length, and which
  members selected each block.

  block_mask [batch, heads, n_blocks]; members[g]: the group's positions in `heads`.
  Returns lists [batch, groups, n_blocks] int32, counts [batch, groups] int32, and bits
  [batch, groups, n_blocks] int32 (bit i: member i selected the block), or None where every
  group has one member (the list is then the head's own).
  """
  mask = block_mask.astype(bool)
  if all(len(m) == 1 for m in members):
    union = mask[:, jnp.asarray([m[0] for m in members])]
    bits = None
  else:
    union = jnp.stack([jnp.any(mask[:, list(m)], axis=1) for m in members], axis=1)
    bits = jnp.stack([sum(mask[:, h].astype(jnp.int32) << i for i, h in enumerate(m))
                      for m in members], axis=1)
  lists, counts = compact.compact_rows(union, interpret=interpret)
  return lists, counts, bits


def sparse_decode(q, k_cache, v_cache, kv_heads, block_mask, lengths, *, block_size: int = 64,
                  interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.sparse_decode`."""
  interpret = common.interpret_flag(interpret)
  kv_ids, members = common.kv_groups(tuple(int(x) for x in kv_heads))
  lists, counts, bits = group_lists(block_mask, members, interpret=interpret)
  lengths = lengths.astype(jnp.int32)
  return block_decode(q, k_cache, v_cache, lists, counts, bits, None, lengths - 1, None,
                      kv_ids=kv_ids, members=members, block_size=block_size, sinks=0,
                      window=None, interpret=interpret)


def ring_decode(q, ring_k, ring_v, ring_pos, kv_heads, q_pos, *, sinks: int, window: int,
                sparse_active=None, block_size: int = 64, interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.ring_decode`."""
  interpret = common.interpret_flag(interpret)
  kv_ids, members = common.kv_groups(tuple(int(x) for x in kv_heads))
  b, c = ring_pos.shape
  active = (jnp.ones((b,), bool) if sparse_active is None else sparse_active.astype(bool))
  nb = common.cdiv(c, block_size)
  pos = jnp.pad(ring_pos.astype(jnp.int32), ((0, 0), (0, nb * block_size - c)),
                constant_values=-1).reshape(b, nb, block_size)
  qp = q_pos.astype(jnp.int32)[:, None, None]
  vis = (pos >= 0) & (pos <= qp) & (
      (pos < sinks) | (pos > qp - window) | ~active[:, None, None])
  lists, counts = compact.compact_rows(jnp.any(vis, axis=-1)[:, None, :], interpret=interpret)
  # Sizing hint: with the window rule on, sinks + window span this many blocks (+ wrap).
  expected = min(nb, common.cdiv(sinks, block_size) + common.cdiv(window, block_size) + 2)
  return block_decode(q, ring_k, ring_v, lists, counts, None, ring_pos.astype(jnp.int32),
                      q_pos.astype(jnp.int32), active.astype(jnp.int32), kv_ids=kv_ids,
                      members=members, block_size=block_size, sinks=int(sinks),
                      window=int(window), expected_blocks=expected, interpret=interpret)
