"""Block-sparse causal prefill: query block i attends to the key blocks its mask selects.

The mask [batch, q_heads, nb, nb] is compacted per (batch, head, query block) into an
ascending block list + count (`compact.compact_rows`, part of this op). Flash attention,
one program per (query block, query head, batch); query tile = key tile = block_size.
Blocks before the query block need no mask; the query block itself (and any selected
block after it, which causality empties) gets the causal mask. Since lists ascend, the
blocks before the own block come first: the kernel finds how many by a short search
over the list row and runs an unmasked loop, then a masked one.

Shapes: q [batch, S, q_heads, head_dim], k, v [batch, S, kv_heads_total, head_dim],
S % block_size == 0. Returns out [batch, S, q_heads, head_dim], lse [batch, S, q_heads].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gpu import common, compact
from pallas_kernels.reference import sparse_prefill as reference

__all__ = ["sparse_prefill", "supported", "reference"]


def _kernel(kvmap_ref, q_ref, k_ref, v_ref, list_ref, count_ref, o_ref, lse_ref, *, bs,
            search_steps, scale, precision):
  iq, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv = kvmap_ref[h]
  q0 = iq * bs
  q = q_ref[b, pl.ds(q0, bs), h, :]
  d = q.shape[-1]
  c = scale * common.LOG2E
  count = count_ref[b, h, iq]
  qpos = q0 + jax.lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
  kcol = jax.lax.broadcasted_iota(jnp.int32, (bs, bs), 1)

  # n_before = number of listed blocks < iq (lists ascend): binary search in [0, count].
  def search(_, lohi):
    lo, hi = lohi
    mid = (lo + hi) // 2
    go_right = (mid < hi) & (list_ref[b, h, iq, jnp.maximum(jnp.minimum(mid, count - 1), 0)] < iq)
    return jnp.where(go_right, mid + 1, lo), jnp.where(go_right, hi, mid)

  n_before, _ = jax.lax.fori_loop(0, search_steps, search, (jnp.int32(0), count))

  def block(slot, carry, masked):
    blk = list_ref[b, h, iq, slot]
    k0 = blk * bs
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


def supported(q, k, v, kv_heads, block_mask, *, block_size: int) -> bool:
  b, s, hq, d = q.shape
  nb = s // block_size
  return (k.shape == v.shape and k.shape[:2] == (b, s) and k.shape[-1] == d
          and s % block_size == 0 and common.is_pow2(block_size) and 16 <= block_size <= 128
          and common.is_pow2(d) and 16 <= d <= 256 and len(kv_heads) == hq
          and block_mask.shape == (b, hq, nb, nb) and nb <= compact.MAX_WIDTH
          and q.dtype == k.dtype == v.dtype
          and q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
          and all(0 <= kv < k.shape[2] for kv in kv_heads))


@functools.partial(jax.jit, static_argnames=("kv_heads", "block_size", "num_warps",
                                             "num_stages", "interpret"))
def _sparse_prefill(q, k, v, block_mask, *, kv_heads, block_size, num_warps, num_stages,
                    interpret):
  b, s, hq, d = q.shape
  nb = s // block_size
  lists, counts = compact.compact_rows(block_mask, interpret=interpret)
  kernel = functools.partial(_kernel, bs=block_size, search_steps=max(1, nb.bit_length()),
                             scale=1.0 / math.sqrt(d), precision=common.dot_precision(q.dtype))
  out, lse = pl.pallas_call(
      kernel,
      grid=(nb, hq, b),
      in_specs=[common.full_spec()] * 6,
      out_specs=[common.full_spec()] * 2,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, s), jnp.float32)],
      compiler_params=common.params(num_warps, num_stages),
      interpret=interpret,
      name="sparse_prefill",
  )(jnp.asarray(kv_heads, jnp.int32), q, k, v, lists, counts)
  return out, jnp.swapaxes(lse, 1, 2)


def sparse_prefill(q, k, v, kv_heads, block_mask, *, block_size: int = 64, chunk: int = 512,
                   num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None):
  """Same contract as `pallas_kernels.reference.sparse_prefill`."""
  del chunk
  return _sparse_prefill(q, k, v, block_mask.astype(bool),
                         kv_heads=tuple(int(x) for x in kv_heads), block_size=block_size,
                         num_warps=num_warps, num_stages=num_stages,
                         interpret=common.interpret_flag(interpret))
