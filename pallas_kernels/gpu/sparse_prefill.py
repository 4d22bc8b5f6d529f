"""Block-sparse causal prefill: query block i attends to the key blocks its mask selects.

The mask [batch, q_heads, nq, nk] is compacted per (batch, head, query block) into an
ascending block list + count (`compact.compact_rows`, part of this op). Flash attention,
one program per (query block, query head, batch); query tile = key tile = block_size.
Query block i sits at global block g = q_offset // block_size + i. Blocks before g need no
mask; block g itself (and any selected block after it, which causality empties) gets the
causal mask. Since lists ascend, the blocks before g come first: the kernel finds how many
by a short search over the list row and runs an unmasked loop, then a masked one.

q_offset is a runtime value (`meta = [q_offset, kv_heads...]`), so one compiled kernel
serves every chunk of a chunked prefill.

Shapes: q [batch, s, q_heads, head_dim] at positions q_offset..; k, v [batch, S, kv_heads,
head_dim] (whole sequence, q_offset 0) or, `kv_major`, [batch, kv_heads, T, head_dim] (the KV
cache read in place); s, T and q_offset multiples of block_size.
Returns out [batch, s, q_heads, head_dim], lse [batch, s, q_heads].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gpu import common, compact
from pallas_kernels.reference import cache_sparse_prefill as reference_cache
from pallas_kernels.reference import sparse_prefill as reference

__all__ = ["sparse_prefill", "cache_sparse_prefill", "supported", "reference",
           "reference_cache"]


def _kernel(meta_ref, q_ref, k_ref, v_ref, list_ref, count_ref, o_ref, lse_ref, *, bs,
            search_steps, scale, precision, kv_major):
  iq, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_offset = meta_ref[0]
  kv = meta_ref[1 + h]
  q0 = iq * bs
  own = q_offset // bs + iq
  q = q_ref[b, pl.ds(q0, bs), h, :]
  d = q.shape[-1]
  c = scale * common.LOG2E
  count = count_ref[b, h, iq]
  qpos = q_offset + q0 + jax.lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
  kcol = jax.lax.broadcasted_iota(jnp.int32, (bs, bs), 1)

  # n_before = number of listed blocks < own (lists ascend): binary search in [0, count].
  def search(_, lohi):
    lo, hi = lohi
    mid = (lo + hi) // 2
    at = list_ref[b, h, iq, jnp.maximum(jnp.minimum(mid, count - 1), 0)]
    go_right = (mid < hi) & (at < own)
    return jnp.where(go_right, mid + 1, lo), jnp.where(go_right, hi, mid)

  n_before, _ = jax.lax.fori_loop(0, search_steps, search, (jnp.int32(0), count))

  def block(slot, carry, masked):
    blk = list_ref[b, h, iq, slot]
    k0 = blk * bs
    if kv_major:
      k = k_ref[b, kv, pl.ds(k0, bs), :]
      v = v_ref[b, kv, pl.ds(k0, bs), :]
    else:
      k = k_ref[b, pl.ds(k0, bs), kv, :]
      v = v_ref[b, pl.ds(k0, bs), kv, :]
    s2 = common.dot_nt(q, k, precision) * c
    vis = (k0 + kcol <= qpos) if masked else None
    return common.online_softmax_step(carry, s2, v, vis, precision)

  carry = (jnp.zeros((bs, d), jnp.float32), jnp.full((bs,), common.NEG_INF, jnp.float32),
           jnp.zeros((bs,), jnp.float32))
  carry = jax.lax.fori_loop(0, n_before, functools.partial(block, masked=False), carry)
  carry = jax.lax.fori_loop(n_before, count, functools.partial(block, masked=True), carry)
  out, lse = common.finish_softmax(*carry)
  o_ref[b, pl.ds(q0, bs), h, :] = out.astype(o_ref.dtype)
  lse_ref[b, h, pl.ds(q0, bs)] = lse


def supported(q, k, v, kv_heads, block_mask, *, block_size: int,
              kv_major: bool = False) -> bool:
  b, s, hq, d = q.shape
  if k.ndim != 4 or k.shape != v.shape:
    return False
  t = k.shape[2] if kv_major else k.shape[1]
  n_kv = k.shape[1] if kv_major else k.shape[2]
  return (k.shape[0] == b and k.shape[-1] == d and (kv_major or t == s)
          and s % block_size == 0 and t % block_size == 0
          and common.is_pow2(block_size) and 16 <= block_size <= 128
          and common.is_pow2(d) and 16 <= d <= 256 and len(kv_heads) == hq
          and block_mask.shape == (b, hq, s // block_size, t // block_size)
          and t // block_size <= compact.MAX_WIDTH
          and q.dtype == k.dtype == v.dtype
          and q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
          and all(0 <= kv < n_kv for kv in kv_heads))


@functools.partial(jax.jit, static_argnames=("kv_heads", "block_size", "num_warps",
                                             "num_stages", "interpret", "kv_major"))
def _sparse_prefill(q, k, v, block_mask, q_offset, *, kv_heads, block_size, num_warps,
                    num_stages, interpret, kv_major):
  b, s, hq, d = q.shape
  nq, nk = block_mask.shape[2:]
  lists, counts = compact.compact_rows(block_mask, interpret=interpret)
  kernel = functools.partial(_kernel, bs=block_size, search_steps=max(1, nk.bit_length()),
                             scale=1.0 / math.sqrt(d), precision=common.dot_precision(q.dtype),
                             kv_major=kv_major)
  meta = jnp.concatenate([q_offset.reshape(1), jnp.asarray(kv_heads, jnp.int32)])
  out, lse = pl.pallas_call(
      kernel,
      grid=(nq, hq, b),
      in_specs=[common.full_spec()] * 6,
      out_specs=[common.full_spec()] * 2,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, s), jnp.float32)],
      compiler_params=common.params(num_warps, num_stages),
      interpret=interpret,
      name="sparse_prefill",
  )(meta, q, k, v, lists, counts)
  return out, jnp.swapaxes(lse, 1, 2)


def sparse_prefill(q, k, v, kv_heads, block_mask, *, block_size: int = 64, chunk: int = 512,
                   num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.sparse_prefill`."""
  del chunk
  return _sparse_prefill(q, k, v, block_mask.astype(bool), jnp.int32(0),
                         kv_heads=tuple(int(x) for x in kv_heads), block_size=block_size,
                         num_warps=num_warps, num_stages=num_stages,
                         interpret=common.interpret_flag(interpret), kv_major=False)


def cache_sparse_prefill(q, k_cache, v_cache, kv_heads, block_mask, *, q_offset=0,
                         block_size: int = 64, chunk: int = 512, num_warps: int = 4,
                         num_stages: int = 3, interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.cache_sparse_prefill` (q_offset may be
  traced)."""
  del chunk
  return _sparse_prefill(q, k_cache, v_cache, block_mask.astype(bool),
                         jnp.asarray(q_offset, jnp.int32),
                         kv_heads=tuple(int(x) for x in kv_heads), block_size=block_size,
                         num_warps=num_warps, num_stages=num_stages,
                         interpret=common.interpret_flag(interpret), kv_major=True)
