"""One decode step of every head of a mixed layer: one split-KV kernel and one merge.

The per-kind decode ops (`decode.ring_decode` twice, `decode.sparse_decode` for dense and
for selected heads) each cost a visibility pass in XLA, a compaction kernel, a decode kernel
and a merge kernel, and the outputs are then put back into head order: about 15 launches
for a layer whose memory traffic takes 15-20 us at 128K. Here the query heads of all four
sets (`reference.DecodeHeads`) are grouped by (set, KV head) into one grid of programs,
(splits, groups, batch), and each program walks its group's blocks by the set's rule:

  ring      every block of the ring buffer; a block none of whose slots is visible (empty,
            or outside sinks + window) is skipped before its keys are loaded;
  local     the full cache, key j at position j: the sink blocks, then the blocks from the
            window's first key to the query's block (every written block where the row is
            below the sparse threshold); no list is built;
  dense     every written block of the full cache;
  selected  the ascending union list of the group's selected blocks (`decode.group_lists`,
            one compaction kernel) with a bit per member head.

Each group's block sequence is cut into `n_splits` equal slices (split-KV); one merge
program per group combines the partials straight into query-head order, so the layer's
output needs no gather. Visibility inside a block follows `reference.layer_decode`.

Shapes: q [batch, q_heads, head_dim]; ring [batch, ring_kv, C, head_dim] with ring_pos
[batch, C]; full cache [batch, kv_heads, T, head_dim] (T % block_size == 0); lengths, q_pos
[batch]; block_mask [batch, selected heads, T // block_size].
Returns out [batch, q_heads, head_dim] (q.dtype), lse [batch, q_heads] f32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import reference as ref
from pallas_kernels.gpu import common, decode

__all__ = ["layer_decode", "supported", "reference", "plan_groups"]

reference = ref.layer_decode
RING, LOCAL, DENSE, SELECTED = range(4)  # the order of DecodeHeads' fields


def plan_groups(heads: ref.DecodeHeads):
  """Static group tables: (kinds, kv_ids, members) with one entry per (set, KV head) group,
  ring groups first, then local, dense and selected ones; members hold layer head indices.
  Also returns the selected groups' members as positions within the selected set."""
  kinds, kv_ids, members, selected_members = [], [], [], ()
  for kind, (hs, kv) in enumerate(heads):
    ids, pos = common.kv_groups(kv)
    kinds += [kind] * len(ids)
    kv_ids += list(ids)
    members += [tuple(hs[p] for p in m) for m in pos]
    if kind == SELECTED:
      selected_members = pos
  return tuple(kinds), tuple(kv_ids), tuple(members), selected_members


def _kernel(q_ref, rk_ref, rv_ref, rpos_ref, fk_ref, fv_ref, len_ref, qpos_ref, active_ref,
            list_ref, count_ref, bits_ref, o_ref, lse_ref, *, kinds, kv_ids, members, bk,
            n_splits, sinks, window, g_pad, g_store, scale, precision):
  s_id, g, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kind = common.static_lookup(g, kinds)
  kv = common.static_lookup(g, kv_ids)
  q = decode.group_queries(q_ref, b, g, members, g_pad)
  gp, d = q.shape
  length, qpos = len_ref[b], qpos_ref[b]
  active = active_ref[b] != 0
  c = scale * common.LOG2E
  lane = jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
  carry0 = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), common.NEG_INF, jnp.float32),
            jnp.zeros((gp,), jnp.float32))

  def local_rule(kpos):
    return (kpos < sinks) | (kpos > qpos - window) | jnp.logical_not(active)

  def split(count):
    per = (count + n_splits - 1) // n_splits
    start = jnp.minimum(s_id * per, count)
    return start, jnp.minimum(start + per, count)

  def walk(count, step):
    start, stop = split(count)
    carry = jax.lax.fori_loop(start, stop, step, carry0)
    decode.store_partial(o_ref, lse_ref, carry, b, g, s_id, g_pad, g_store)

  def attend(carry, k_ref, v_ref, k0, inside, vis):
    vis2 = jnp.broadcast_to(vis[None, :], (gp, bk)) if vis.ndim == 1 else vis
    return decode.attend_block(carry, q, k_ref, v_ref, b, kv, k0, inside, vis2, c, precision)

  present = set(kinds)
  if RING in present:
    cap = rk_ref.shape[2]

    @pl.when(kind == RING)
    def _():
      def step(blk, carry):
        k0 = blk * bk
        inside = k0 + lane < cap
        kpos = plgpu.load(rpos_ref.at[b, pl.ds(k0, bk)], mask=inside, other=-1)
        vis = inside & (kpos >= 0) & (kpos <= qpos) & local_rule(kpos)
        seen = jnp.max(vis.astype(jnp.int32)) > 0
        return jax.lax.cond(seen, lambda cr: attend(cr, rk_ref, rv_ref, k0, inside, vis),
                            lambda cr: cr, carry)

      walk(jnp.int32(common.cdiv(cap, bk)), step)

  if LOCAL in present or DENSE in present:
    # Blocks of the full cache in walking order: `n_head` leading blocks 0.. (the sinks),
    # then consecutive blocks from `first`. Dense heads (and local heads of an inactive
    # row) walk every written block as one leading run.
    t = fk_ref.shape[2]
    written = (length + bk - 1) // bk
    local = kind == LOCAL
    n_all = jnp.where(local, jnp.minimum(written, jnp.maximum(qpos, -1) // bk + 1), written)
    n_all = jnp.where(local & (qpos < 0), 0, n_all)
    windowed = local & active
    n_head = jnp.where(windowed, jnp.minimum(common.cdiv(sinks, bk), n_all), n_all)
    first = jnp.maximum(n_head, jnp.maximum(qpos - window + 1, 0) // bk)
    count = jnp.where(windowed, n_head + jnp.maximum(n_all - first, 0), n_all)

    @pl.when((kind == LOCAL) | (kind == DENSE))
    def _():
      def step(i, carry):
        blk = jnp.where(i < n_head, i, first + i - n_head)
        k0 = blk * bk
        kpos = k0 + lane
        inside = kpos < t
        vis = inside & (kpos < length)
        vis &= jnp.logical_not(local) | ((kpos <= qpos) & local_rule(kpos))
        return attend(carry, fk_ref, fv_ref, k0, inside, vis)

      walk(count, step)

  if SELECTED in present:
    t = fk_ref.shape[2]
    first_sel = kinds.index(SELECTED)
    head = jax.lax.broadcasted_iota(jnp.int32, (gp,), 0)

    @pl.when(kind == SELECTED)
    def _():
      sg = g - first_sel

      def step(slot, carry):
        blk = list_ref[b, sg, slot]
        k0 = blk * bk
        kpos = k0 + lane
        inside = kpos < t
        vis = jnp.broadcast_to((inside & (kpos < length))[None, :], (gp, bk))
        if bits_ref is not None:
          vis &= (((bits_ref[b, sg, blk] >> head) & 1) != 0)[:, None]
        return attend(carry, fk_ref, fv_ref, k0, inside, vis)

      walk(count_ref[b, sg], step)


@functools.partial(jax.jit, static_argnames=(
    "heads", "block_size", "sinks", "window", "num_warps", "num_stages", "interpret"))
def _layer_decode(q, ring_k, ring_v, ring_pos, full_k, full_v, lengths, q_pos, block_mask,
                  active, *, heads, block_size, sinks, window, num_warps=4, num_stages=2,
                  interpret=False):
  b, hq, d = q.shape
  kinds, kv_ids, members, sel_members = plan_groups(heads)
  n_groups = len(kinds)
  g_store = max(len(m) for m in members)
  g_pad = max(16, common.next_pow2(g_store))
  lists = counts = bits = None
  if sel_members:
    lists, counts, bits = decode.group_lists(block_mask, sel_members, interpret=interpret)
  # Split sizing: the local sets' span (sinks + window) sets the scale of a group's work.
  expected = common.cdiv(sinks, block_size) + common.cdiv(window, block_size) + 2
  n_splits = decode.split_count(b, n_groups, expected)
  if interpret:  # the interpreter runs programs one by one: a few splits still test merging
    n_splits = min(n_splits, 3)
  kernel = functools.partial(
      _kernel, kinds=kinds, kv_ids=kv_ids, members=members, bk=block_size,
      n_splits=n_splits, sinks=int(sinks), window=int(window), g_pad=g_pad, g_store=g_store,
      scale=1.0 / math.sqrt(d), precision=common.dot_precision(q.dtype))
  args = [q, ring_k, ring_v, ring_pos, full_k, full_v, lengths, q_pos, active, lists, counts,
          bits]
  o_part, lse_part = pl.pallas_call(
      kernel,
      grid=(n_splits, n_groups, b),
      in_specs=[None if a is None else common.full_spec() for a in args],
      out_specs=[common.full_spec()] * 2,
      out_shape=[jax.ShapeDtypeStruct((b, n_groups, n_splits, g_store, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, n_groups, n_splits, g_store), jnp.float32)],
      compiler_params=common.params(num_warps, num_stages),
      interpret=interpret,
      name="layer_decode",
  )(*args)
  return decode.merge_splits(o_part, lse_part, members=members, q_heads=hq, dtype=q.dtype,
                             interpret=interpret)


def supported(q, ring_k, ring_v, ring_pos, full_k, full_v, *, heads, block_size: int) -> bool:
  """Whether the kernel takes these arguments (else the per-set ops run)."""
  try:
    heads.check(q.shape[1])
  except ValueError:
    return False

  def takes(cache_k, cache_v, kv):  # decode.supported on a q of just these heads
    qs = jax.ShapeDtypeStruct((q.shape[0], len(kv), q.shape[-1]), q.dtype)
    return decode.supported(qs, cache_k, cache_v, kv, block_size=block_size)

  ring_kv = heads.ring[1]
  full_kv = heads.full[1]
  if ring_kv and (ring_k is None or ring_pos is None
                  or ring_pos.shape != (q.shape[0], ring_k.shape[2])
                  or not takes(ring_k, ring_v, ring_kv)):
    return False
  if full_kv and (full_k is None or full_k.shape[2] % block_size
                  or not takes(full_k, full_v, full_kv)):
    return False
  return True


def layer_decode(q, ring_k, ring_v, ring_pos, full_k, full_v, lengths, q_pos, block_mask, *,
                 heads: ref.DecodeHeads, sinks: int, window: int, sparse_active=None,
                 block_size: int = 64, interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.layer_decode`."""
  heads.check(q.shape[1])
  b = q.shape[0]
  active = (jnp.ones((b,), jnp.int32) if sparse_active is None
            else sparse_active.astype(jnp.int32))
  if not heads.ring[0]:  # arrays no program reads stay out of the call (they may be empty)
    ring_k = ring_v = ring_pos = None
  if not heads.full[0]:
    full_k = full_v = None
  if not heads.selected[0]:
    block_mask = None
  return _layer_decode(
      q, ring_k, ring_v, None if ring_pos is None else ring_pos.astype(jnp.int32), full_k,
      full_v, lengths.astype(jnp.int32), q_pos.astype(jnp.int32), block_mask, active,
      heads=heads, block_size=int(block_size), sinks=int(sinks), window=int(window),
      interpret=common.interpret_flag(interpret))
