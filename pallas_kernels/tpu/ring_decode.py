"""Local-head decode over a sink + window ring buffer on TPU: Pallas / Mosaic.

Semantics: `reference.ring_decode`. Slot c of the ring holds position `ring_pos[b, c]`
(-1 empty); the query at `q_pos` sees a slot iff `0 <= pos <= q_pos` and, where
`sparse_active`, `pos < sinks or pos > q_pos - window`. Visibility depends on the batch
row only, so every query head of a KV head shares it: a grid step serves all the query
heads of one KV head (GQA) over one chunk of slots, grid `(batch, kv_groups, chunks)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import reference as _reference
from pallas_kernels.tpu import (LANES, Unsupported, finish_softmax, init_softmax, lane_width_ok,
                                nt_dot, softmax_step)

reference = _reference.ring_decode


def chunk_slots(capacity: int, preferred: int = 1024) -> int | None:
  """Slots per grid step: the whole ring if it is under 128 slots, else the largest
  multiple of 128 (whole score vregs) <= preferred dividing it; None if none does."""
  if capacity < LANES:
    return capacity
  for c in range(preferred - preferred % LANES, LANES - 1, -LANES):
    if capacity % c == 0:
      return c
  return None


def unsupported(q, ring_k, chunk: int | None = None) -> str | None:
  """Why the kernel does not tile q [batch, q_heads, head_dim] over ring_k [batch, kv_heads,
  C, head_dim] (chunk: as `ring_decode` takes it), or None."""
  cap, d = ring_k.shape[2], q.shape[-1]
  chunk = chunk or chunk_slots(cap)
  if chunk is None or cap % chunk or not lane_width_ok(chunk) or (chunk % 16 and chunk != cap):
    return f"ring_decode: capacity {cap} has no chunk size (a multiple of 128)"
  if not lane_width_ok(d):  # the output rows: < 128 lanes or whole vregs
    return f"ring_decode: head_dim={d} is neither < {LANES} nor a multiple of {LANES}"
  return None


def _kernel(kvmap_ref, qpos_ref, active_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, lse_ref,
            m_sc, l_sc, acc_sc, *, sinks: int, window: int, scale: float, chunks: int):
  del kvmap_ref  # used by the index maps only
  bi, c = pl.program_id(0), pl.program_id(2)
  q_pos = qpos_ref[bi]

  @pl.when(c == 0)
  def _init():
    init_softmax(m_sc, l_sc, acc_sc)

  s = nt_dot(q_ref[...], k_ref[...]) * scale  # [G, chunk]
  pos = jnp.broadcast_to(pos_ref[...], s.shape)  # [1, chunk] -> [G, chunk]
  local = (pos < sinks) | (pos > q_pos - window) | (active_ref[bi] == 0)
  s = jnp.where((pos >= 0) & (pos <= q_pos) & local, s, -jnp.inf)
  softmax_step(s, lambda: v_ref[...], m_sc, l_sc, acc_sc)

  @pl.when(c == chunks - 1)
  def _finish():
    lse_ref[...] = finish_softmax(m_sc, l_sc, acc_sc, o_ref)


@functools.partial(jax.jit, static_argnames=("kv_heads", "sinks", "window", "chunk",
                                             "interpret"))
def ring_decode(q, ring_k, ring_v, ring_pos, kv_heads, q_pos, *, sinks: int, window: int,
                sparse_active=None, chunk: int | None = None, interpret=False):
  """The `reference.ring_decode` contract on TPU.

  Args:
    q: [batch, q_heads, head_dim]; ring_k, ring_v: [batch, kv_heads, C, head_dim];
    ring_pos: [batch, C] int32; q_pos: [batch]; sparse_active: optional bool [batch].
    chunk: slots per grid step (must divide C; default from `chunk_slots`).
  Returns: out [batch, q_heads, head_dim] (q.dtype), lse [batch, q_heads] float32.
  """
  b, hq, d = q.shape
  _, hkv, cap, _ = ring_k.shape
  if ring_pos.shape != (b, cap) or q_pos.shape != (b,):
    raise ValueError(f"ring_decode: ring {ring_k.shape}, ring_pos {ring_pos.shape}, q_pos "
                     f"{q_pos.shape} do not match")
  if len(kv_heads) != hq or not all(0 <= h < hkv for h in kv_heads):
    raise ValueError(f"kv_heads={kv_heads} does not map {hq} query heads onto {hkv} KV heads")
  if why := unsupported(q, ring_k, chunk):
    raise Unsupported(why)
  chunk = chunk or chunk_slots(cap)
  groups: dict[int, list[int]] = {}
  for h, kv in enumerate(kv_heads):
    groups.setdefault(kv, []).append(h)
  kvs = sorted(groups)
  g_max = max(len(hs) for hs in groups.values())
  members = np.full((len(kvs), g_max), hq, np.int32)
  for gi, kv in enumerate(kvs):
    members[gi, :len(groups[kv])] = groups[kv]
  qg = jnp.pad(q, ((0, 0), (0, 1), (0, 0)))[:, members]  # [b, groups, G, d]
  if sparse_active is None:
    sparse_active = jnp.ones((b,), bool)
  chunks = cap // chunk

  def kv_map(bi, g, c, kvmap_ref, *_):
    return bi, kvmap_ref[g], c, 0

  def group_map(bi, g, c, *_):
    return bi, g, 0, 0

  out, lse = pl.pallas_call(
      functools.partial(_kernel, sinks=sinks, window=window, scale=1.0 / math.sqrt(d),
                        chunks=chunks),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, len(kvs), chunks),
          in_specs=[pl.BlockSpec((None, None, g_max, d), group_map),
                    pl.BlockSpec((None, None, chunk, d), kv_map),
                    pl.BlockSpec((None, None, chunk, d), kv_map),
                    pl.BlockSpec((None, 1, chunk), lambda bi, g, c, *_: (bi, 0, c))],
          out_specs=[pl.BlockSpec((None, None, g_max, d), group_map),
                     pl.BlockSpec((None, None, g_max, LANES), group_map)],
          scratch_shapes=[pltpu.VMEM((g_max, LANES), jnp.float32),
                          pltpu.VMEM((g_max, LANES), jnp.float32),
                          pltpu.VMEM((g_max, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, len(kvs), g_max, d), q.dtype),
                 jax.ShapeDtypeStruct((b, len(kvs), g_max, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="rtpurbo_ring_decode",
  )(jnp.asarray(kvs, jnp.int32), q_pos.astype(jnp.int32), sparse_active.astype(jnp.int32), qg,
    ring_k, ring_v, ring_pos.astype(jnp.int32)[:, None, :])
  where = np.zeros((hq, 2), np.int32)
  for gi, kv in enumerate(kvs):
    for m, h in enumerate(groups[kv]):
      where[h] = (gi, m)
  return out[:, where[:, 0], where[:, 1]], lse[:, where[:, 0], where[:, 1], 0]
