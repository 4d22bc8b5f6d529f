"""Flash-attention prefill over a contiguous key range: sink + sliding window, or causal.

One program per (query tile, query head, batch). Query i (absolute position q_offset + i)
sees key j iff j <= q_offset + i, j < kv_len and, with a window, j < sinks or
q_offset + i - window < j. A program walks three key ranges:
  * sink blocks that lie entirely before its window range (only the sink rule applies);
  * the window range [first, last] of the tile, split into masked edge blocks and an
    unmasked interior (every key visible to every query of the tile), so most blocks pay
    no mask arithmetic.
GQA: `kv_heads[h]` travels as an int32 input; K/V are indexed per program.

q_offset is a runtime value: it travels in the same small int32 input as the head map
(`meta = [q_offset, kv_heads...]`), and every loop bound and mask derives from it inside the
kernel. A caller may pass a python int or a traced int32 scalar (chunked prefill jits one
function whose offset changes per chunk); both compile to the same kernel.

Shapes: q [batch, q_len, q_heads, head_dim]; k, v [batch, kv_len, kv_heads_total, head_dim]
(or, causal with `kv_major`, [batch, kv_heads_total, kv_len, head_dim]: the cache layout).
Returns out [batch, q_len, q_heads, head_dim] (q.dtype) and lse [batch, q_len, q_heads] f32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gpu import common
from pallas_kernels.reference import causal_attention as reference_causal
from pallas_kernels.reference import window_attention as reference

__all__ = ["window_attention", "causal_attention", "supported", "reference",
           "reference_causal"]


def _kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, bq, bk, sinks, window,
            kv_len, scale, precision, kv_major):
  iq, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_offset = meta_ref[0]
  kv = meta_ref[1 + h]
  q0 = iq * bq
  q = q_ref[b, pl.ds(q0, bq), h, :]
  d = q.shape[-1]
  c = scale * common.LOG2E
  first_q = q_offset + q0  # absolute position of the tile's first query
  last_q = first_q + bq - 1
  qpos = first_q + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)

  def block(j, carry, masked):
    k0 = j * bk
    if kv_major:  # [batch, kv_heads, kv_len, head_dim]: the KV cache's own layout
      k = k_ref[b, kv, pl.ds(k0, bk), :]
      v = v_ref[b, kv, pl.ds(k0, bk), :]
    else:
      k = k_ref[b, pl.ds(k0, bk), kv, :]
      v = v_ref[b, pl.ds(k0, bk), kv, :]
    s2 = common.dot_nt(q, k, precision) * c
    vis = None
    if masked:
      kpos = k0 + col
      vis = (kpos <= qpos) & (kpos < kv_len)
      if window is not None:
        vis &= (kpos > qpos - window) | (kpos < sinks)
    return common.online_softmax_step(carry, s2, v, vis, precision)

  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), common.NEG_INF, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  end = jnp.minimum(kv_len, last_q + 1)  # exclusive bound of keys any query here sees
  hi = (end + bk - 1) // bk
  if window is None:
    lo = jnp.int32(0)
    u_lo = jnp.int32(0)
  else:
    lo = jnp.maximum(first_q - window + 1, 0) // bk
    u_lo = (jnp.maximum(last_q - window + 1, 0) + bk - 1) // bk
    # Sink blocks below the window range: only keys < sinks are visible there.
    n_sink = jnp.minimum((sinks + bk - 1) // bk, lo)
    carry = jax.lax.fori_loop(0, n_sink, functools.partial(block, masked=True), carry)
  u_hi = jnp.minimum(jnp.minimum(hi, (first_q + 1) // bk), kv_len // bk)
  u1 = jnp.clip(u_lo, lo, hi)
  u2 = jnp.clip(u_hi, u1, hi)
  carry = jax.lax.fori_loop(lo, u1, functools.partial(block, masked=True), carry)
  carry = jax.lax.fori_loop(u1, u2, functools.partial(block, masked=False), carry)
  carry = jax.lax.fori_loop(u2, hi, functools.partial(block, masked=True), carry)
  out, lse = common.finish_softmax(*carry)
  o_ref[b, pl.ds(q0, bq), h, :] = out.astype(o_ref.dtype)
  lse_ref[b, h, pl.ds(q0, bq)] = lse


def supported(q, k, v, kv_heads, *, block_q: int = 128, block_k: int = 64,
              kv_major: bool = False) -> bool:
  d = q.shape[-1]
  n_kv = k.shape[1] if kv_major else k.shape[2]
  return (q.ndim == 4 and k.shape == v.shape and k.shape[-1] == d and common.is_pow2(d)
          and 16 <= d <= 256 and len(kv_heads) == q.shape[2] and q.dtype == k.dtype == v.dtype
          and q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
          and all(0 <= kv < n_kv for kv in kv_heads))


def _offset(q_offset):
  """q_offset as an int32 scalar array (python int, numpy or traced scalar)."""
  if jnp.ndim(q_offset) != 0 or not jnp.issubdtype(jnp.result_type(q_offset), jnp.integer):
    raise ValueError(f"q_offset must be an integer scalar, got {q_offset!r}")
  return jnp.asarray(q_offset, jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "kv_heads", "sinks", "window", "block_q", "block_k", "num_warps", "num_stages",
    "interpret", "kv_major"))
def _flash(q, k, v, q_offset, *, kv_heads, sinks, window, block_q, block_k, num_warps,
           num_stages, interpret, kv_major=False):
  b, sq, hq, d = q.shape
  seq_axis = 2 if kv_major else 1
  kv_len = k.shape[seq_axis]
  bq = min(block_q, max(16, common.next_pow2(sq)))
  sq_pad = common.cdiv(sq, bq) * bq
  kv_pad = common.cdiv(kv_len, block_k) * block_k
  if sq_pad != sq:
    q = jnp.pad(q, ((0, 0), (0, sq_pad - sq), (0, 0), (0, 0)))
  if kv_pad != kv_len:
    widths = [(0, 0)] * 4
    widths[seq_axis] = (0, kv_pad - kv_len)
    k, v = jnp.pad(k, widths), jnp.pad(v, widths)
  meta = jnp.concatenate([q_offset.reshape(1), jnp.asarray(kv_heads, jnp.int32)])
  kernel = functools.partial(
      _kernel, bq=bq, bk=block_k, sinks=sinks, window=window, kv_len=kv_len,
      scale=1.0 / math.sqrt(d), precision=common.dot_precision(q.dtype), kv_major=kv_major)
  out, lse = pl.pallas_call(
      kernel,
      grid=(sq_pad // bq, hq, b),
      in_specs=[common.full_spec()] * 4,
      out_specs=[common.full_spec()] * 2,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, sq_pad), jnp.float32)],
      compiler_params=common.params(num_warps, num_stages),
      interpret=interpret,
      name="window_attention" if window is not None else "causal_attention",
  )(meta, q, k, v)
  return out[:, :sq], jnp.swapaxes(lse, 1, 2)[:, :sq]


def window_attention(q, k, v, kv_heads, *, sinks: int, window: int, q_offset=0,
                     chunk: int = 512, block_q: int = 128, block_k: int = 64,
                     num_warps: int = 8, num_stages: int = 3, interpret: bool | None = None):
  """Sink + sliding-window causal prefill (see module docstring). Returns (out, lse).

  q_offset: python int or int32 scalar (may be traced).
  """
  del chunk
  return _flash(q, k, v, _offset(q_offset), kv_heads=tuple(int(x) for x in kv_heads),
                sinks=int(sinks), window=int(window), block_q=block_q,
                block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                interpret=common.interpret_flag(interpret))


def causal_attention(q, k, v, kv_heads, *, q_offset=0, chunk: int = 512,
                     block_q: int = 128, block_k: int = 64, num_warps: int = 8,
                     num_stages: int = 3, interpret: bool | None = None,
                     kv_major: bool = False):
  """Dense causal prefill with the same kernel (no window rule). Returns (out, lse).

  q_offset: python int or int32 scalar (may be traced). kv_major: k, v are
  [batch, kv_heads, kv_len, head_dim] (a KV cache read in place, no transposed copy).
  """
  del chunk
  return _flash(q, k, v, _offset(q_offset), kv_heads=tuple(int(x) for x in kv_heads),
                sinks=0, window=None, block_q=block_q, block_k=block_k,
                num_warps=num_warps, num_stages=num_stages,
                interpret=common.interpret_flag(interpret), kv_major=bool(kv_major))
