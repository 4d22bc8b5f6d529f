"""Sink + sliding-window (and plain causal) prefill attention on TPU: Pallas / Mosaic.

One flash-attention kernel with a positional mask. Query i sits at `q_offset + i`, key j at
j (contiguous prefill, as in `reference.window_attention`). Key j is visible to query t iff
`j <= t` and, for the local rule, `j < sinks or t - window < j`.

Layout: activations stay `[batch, seq, heads * head_dim]` (a free reshape of
`[batch, seq, heads, head_dim]`); a head is one 128-lane column block, so no transpose is
needed and `head_dim % 128 == 0` is required. The KV head of each query head comes from a
scalar-prefetched table (GQA with any head map).

Grid `(batch, q_heads, q_blocks, kv_steps)`. For query block i the kv steps visit, in
order, the sink blocks `[0, n_sink)` and then the window blocks starting at
`max(n_sink, first block touched by the window)`; each key block is visited at most once.
A step past the causal end repeats the previous block index (the pipeline then skips the
copy) and does no math. So the work per query block is O(sinks + window), not O(S).

Outputs: out `[batch, seq, heads, head_dim]` in q.dtype (zeros for a query with no visible
key) and lse `[batch, seq, heads]` float32 (-inf for such a query): the reference contract.
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
from pallas_kernels.tpu import (LANES, Unsupported, finish_softmax, init_softmax, nt_dot,
                                softmax_step)

reference = _reference.window_attention
causal_reference = _reference.causal_attention



@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static block geometry; `kv_block` is shared by the index map and the kernel body."""

  bq: int
  bk: int
  nk: int  # key blocks (after padding)
  sq: int  # real queries
  skv: int  # real keys
  q_offset: int
  sinks: int
  window: int | None
  n_sink: int  # kv steps spent on sink blocks
  n_win: int  # kv steps spent on window (or causal) blocks

  @property
  def steps(self) -> int:
    return self.n_sink + self.n_win

  def kv_block(self, i, j):
    """(key block index, whether step j of query block i does math). Traced int32."""
    q_lo = self.q_offset + i * self.bq
    q_hi = jnp.minimum(q_lo + self.bq - 1, self.q_offset + self.sq - 1)
    hi = jnp.minimum(q_hi // self.bk, self.nk - 1)  # last causal block
    if self.window is None:
      start = jnp.int32(0)
    else:
      first = jnp.maximum(q_lo - self.window + 1, 0) // self.bk
      start = jnp.maximum(first, self.n_sink)
    raw = jnp.where(j < self.n_sink, j, start + (j - self.n_sink))
    active = raw <= hi
    return jnp.minimum(raw, hi), active


def _geometry(sq, skv, bq, bk, q_offset, sinks, window) -> _Geometry:
  nk = -(-skv // bk)
  if window is None:
    n_sink, n_win = 0, nk
  else:
    n_sink = min(nk, -(-sinks // bk))
    span = bq + window - 2  # keys between the first query's window start and the last query
    n_win = min(nk, span // bk + 2)
  return _Geometry(bq=bq, bk=bk, nk=nk, sq=sq, skv=skv, q_offset=q_offset, sinks=sinks,
                   window=window, n_sink=n_sink, n_win=n_win)


def _kernel(kvmap_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
            geo: _Geometry, scale: float):
  del kvmap_ref  # used by the index maps only
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    init_softmax(m_sc, l_sc, acc_sc)

  blk, active = geo.kv_block(i, j)

  @pl.when(active)
  def _step():
    s = nt_dot(q_ref[...], k_ref[...]) * scale  # [bq, bk]
    q_pos = geo.q_offset + i * geo.bq + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = blk * geo.bk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    vis = (k_pos <= q_pos) & (k_pos < geo.skv)
    if geo.window is not None:
      vis &= (k_pos < geo.sinks) | (k_pos > q_pos - geo.window)
    softmax_step(jnp.where(vis, s, -jnp.inf), lambda: v_ref[...], m_sc, l_sc, acc_sc)

  @pl.when(j == geo.steps - 1)
  def _finish():
    lse = finish_softmax(m_sc, l_sc, acc_sc, o_ref)  # [bq, 128], lanes replicated
    lse_ref[...] = jnp.transpose(lse)[:1]  # one lane-dense row [1, bq]


def unsupported(q) -> str | None:
  """Why the kernel does not tile q [batch, q_len, q_heads, head_dim], or None: a head is one
  lane block, so head_dim must be a multiple of 128."""
  d = q.shape[-1]
  return None if d % LANES == 0 else f"head_dim={d}: the TPU kernel needs a multiple of {LANES}"


def _pick_block(n: int, preferred: int) -> tuple[int, int]:
  """(block, padded length): a multiple of 128 (lane-dense LSE rows, aligned transposes)."""
  if preferred % LANES:
    raise ValueError(f"block size {preferred} is not a multiple of {LANES}")
  b = min(preferred, -(-n // LANES) * LANES)
  return b, -(-n // b) * b


@functools.partial(jax.jit, static_argnames=("kv_heads", "sinks", "window", "q_offset",
                                             "block_q", "block_k", "interpret"))
def flash_attention(q, k, v, kv_heads, *, sinks: int = 0, window: int | None = None,
                    q_offset: int = 0, block_q: int = 512, block_k: int = 512,
                    interpret=False):
  """Causal (window=None) or sink+window flash attention with LSE.

  Args:
    q: [batch, q_len, q_heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
      head_dim % 128 == 0. kv_heads: static tuple, KV head of each query head.
    block_q, block_k: preferred tile sizes (multiples of 128); short sequences use one tile.
    interpret: False (Mosaic) or a `pltpu.InterpretParams`.
  Returns: out [batch, q_len, q_heads, head_dim] (q.dtype), lse [batch, q_len, q_heads] f32.
  """
  b, sq, hq, d = q.shape
  skv, hkv = k.shape[1], k.shape[2]
  if why := unsupported(q):
    raise Unsupported(why)
  if len(kv_heads) != hq or not all(0 <= h < hkv for h in kv_heads):
    raise ValueError(f"kv_heads={kv_heads} does not map {hq} query heads onto {hkv} KV heads")
  if window is not None and window < 1:
    raise ValueError(f"window={window} must be >= 1")
  bq, sq_p = _pick_block(sq, block_q)
  bk, skv_p = _pick_block(skv, block_k)
  geo = _geometry(sq, skv, bq, bk, q_offset, sinks if window is not None else 0, window)

  def pad(x, n):
    return x if x.shape[1] == n else jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))

  q2 = pad(q, sq_p).reshape(b, sq_p, hq * d)
  k2 = pad(k, skv_p).reshape(b, skv_p, hkv * d)
  v2 = pad(v, skv_p).reshape(b, skv_p, hkv * d)
  # A head is one lane block of width d in [.., heads * d]: block index h is lane offset h * d.
  def q_map(bi, h, i, j, kvmap):
    return bi, i, h

  def kv_map(bi, h, i, j, kvmap):
    blk, _ = geo.kv_block(i, j)
    return bi, blk, kvmap[h]

  def lse_map(bi, h, i, j, kvmap):
    return bi, h, 0, i

  grid = (b, hq, sq_p // bq, geo.steps)
  out, lse = pl.pallas_call(
      functools.partial(_kernel, geo=geo, scale=1.0 / math.sqrt(d)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=grid,
          in_specs=[pl.BlockSpec((None, bq, d), q_map),
                    pl.BlockSpec((None, bk, d), kv_map),
                    pl.BlockSpec((None, bk, d), kv_map)],
          out_specs=[pl.BlockSpec((None, bq, d), q_map),
                     pl.BlockSpec((None, None, 1, bq), lse_map)],
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, sq_p, hq * d), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, 1, sq_p), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="rtpurbo_window_attention" if window is not None else "rtpurbo_causal_attention",
  )(jnp.asarray(kv_heads, jnp.int32), q2, k2, v2)
  out = out.reshape(b, sq_p, hq, d)[:, :sq]
  lse = jnp.transpose(lse[:, :, 0, :sq], (0, 2, 1))
  return out, lse


# Training: pallas_call has no autodiff. The forward runs the kernel; the backward is the VJP
# of the jnp reference (recomputed from q, k, v), so gradients are exact and the kernel is
# safe inside a loss. (A Pallas backward kernel would be faster; none exists yet.)
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def _differentiable(q, k, v, kv_heads, sinks, window, q_offset, block_q, block_k, interpret):
  return flash_attention(q, k, v, kv_heads, sinks=sinks, window=window, q_offset=q_offset,
                         block_q=block_q, block_k=block_k, interpret=interpret)


def _forward(q, k, v, kv_heads, sinks, window, q_offset, block_q, block_k, interpret):
  out = _differentiable(q, k, v, kv_heads, sinks, window, q_offset, block_q, block_k,
                        interpret)
  return out, (q, k, v)


def _backward(kv_heads, sinks, window, q_offset, block_q, block_k, interpret, saved, grads):
  del block_q, block_k, interpret
  if window is None:
    fn = lambda q, k, v: _reference.causal_attention(q, k, v, kv_heads, q_offset=q_offset)
  else:
    fn = lambda q, k, v: _reference.window_attention(q, k, v, kv_heads, sinks=sinks,
                                                     window=window, q_offset=q_offset)
  _, vjp = jax.vjp(fn, *saved)
  return vjp(grads)


_differentiable.defvjp(_forward, _backward)


def window_attention(q, k, v, kv_heads, *, sinks: int, window: int, q_offset: int = 0,
                     block_q: int = 512, block_k: int = 512, interpret=False):
  """Sink + window prefill (the `reference.window_attention` contract). Returns (out, lse).
  Differentiable (reference backward)."""
  return _differentiable(q, k, v, tuple(kv_heads), sinks, window, q_offset, block_q, block_k,
                         interpret)


def causal_attention(q, k, v, kv_heads, *, q_offset: int = 0, block_q: int = 512,
                     block_k: int = 512, interpret=False):
  """Dense causal prefill (the `reference.causal_attention` contract). Returns (out, lse).
  Differentiable (reference backward)."""
  return _differentiable(q, k, v, tuple(kv_heads), 0, None, q_offset, block_q, block_k,
                         interpret)
