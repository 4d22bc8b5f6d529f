"""Hopper flash-attention prefill in Mosaic GPU: sink + sliding window, or causal.

The same rule as `window_attention.py` (the Triton kernel): query i at absolute position
q_offset + i sees key j iff j <= q_offset + i, j < kv_len and, with a window, j < sinks or
q_offset + i - window < j. q_offset may be traced (a prefill chunk at a runtime position):
it travels as a one-element operand read by every warpgroup, so one compiled kernel serves
every chunk. A query that sees no key (past kv_len + window) gets zeros and lse -inf, as in
the reference.

One program per (query head, query tile of 2 * block_q rows, batch), three warpgroups:
  * a memory warpgroup streams the program's key blocks by TMA into a ring of `stages`
    K / V slots (a slot is refilled once both compute warpgroups have released it);
  * two compute warpgroups own block_q query rows each: S = Q K^T and O += P V on wgmma,
    the online softmax in registers (exp2 with the scale folded into one multiply); with
    `Tiles.pingpong` they alternate on the tensor cores, one's softmax under the other's
    matmul.
The key blocks of a program are the sink blocks below its window range (only keys < sinks
are visible there), then the window range [lo, hi) of the whole tile; causal attention is
the window range from block 0. Both compute warpgroups consume every block in that order
(the ring's release barriers count both). Each warpgroup masks only the blocks where some
key is hidden from one of its rows; the interior of the window is unmasked.

A hidden score is a finite -1e30, not -inf: a row whose first blocks are all hidden takes
garbage weight there, and its first visible key rescales that weight by exp2(-1e30 - m) = 0.
A row that sees no key at all keeps a running max at or below -1e30 and is written as
zeros with lse -inf at the end.

Shapes: q [batch, q_len, q_heads, head_dim]; k, v [batch, kv_len, kv_heads_total, head_dim],
or with `kv_major` (`cache_causal_attention`: a KV cache read in place)
[batch, kv_heads_total, T, head_dim]; head_dim 64 or 128, bf16 / f16. Returns out
[batch, q_len, q_heads, head_dim] and lse [batch, q_len, q_heads] f32 (natural log), as
`reference.window_attention` / `reference.causal_attention` /
`reference.cache_causal_attention` do.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import common
from pallas_kernels.reference import cache_causal_attention as reference_cache
from pallas_kernels.reference import causal_attention as reference_causal
from pallas_kernels.reference import window_attention as reference

__all__ = ["window_attention", "causal_attention", "cache_causal_attention", "supported",
           "Tiles", "reference", "reference_causal", "reference_cache"]

HIDDEN = -1e30  # a hidden score (log2 domain): finite, see the module docstring
COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class Tiles:
  """block_q: query rows per compute warpgroup (a program holds 2 * block_q); block_kv: keys
  per pipeline step; stages: K / V slots in flight; pingpong: the two compute warpgroups
  take turns on the tensor cores (one's softmax runs while the other's S = Q K^T does),
  ordered by a shared barrier."""
  block_q: int = 64
  block_kv: int = 128
  stages: int = 2
  pingpong: bool = True

  def __post_init__(self):
    if self.block_q % 64 or self.block_kv % 64 or self.stages < 2:
      raise ValueError(f"{self}: block_q and block_kv must be multiples of 64, stages >= 2")


def key_schedule(first_q, last_q, *, bk: int, sinks: int, window: int | None, kv_len: int):
  """(n_sink, lo, hi): the key blocks a program of queries [first_q, last_q] reads, in order:
  sink blocks 0 .. n_sink - 1 below its window range, then blocks lo .. hi - 1. Works on
  python ints and traced int32 scalars alike."""
  end = jnp.minimum(kv_len, last_q + 1)  # keys any query of the tile can see are below
  hi = (end + bk - 1) // bk
  if window is None:
    return 0, 0, hi
  lo = jnp.minimum(jnp.maximum(first_q - window + 1, 0) // bk, hi)
  n_sink = jnp.minimum((sinks + bk - 1) // bk, lo)
  return n_sink, lo, hi


def _kernel(offset_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem,
            k_full, v_full, q_full, k_free, v_free, turn, *, tiles, kv_heads, sinks, window,
            q_len, kv_len, kv_major, scale, dtype, interpret):
  bq, bk, stages = tiles.block_q, tiles.block_kv, tiles.stages
  b, h, t = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
  wg = lax.axis_index("wg")
  q_offset = offset_ref[0]
  tile_q0 = t * (COMPUTE_WGS * bq)  # first row of the program, relative to q
  # The tile's last real query bounds the keys read (padding rows past q_len need none).
  last_q = q_offset + jnp.minimum(tile_q0 + COMPUTE_WGS * bq, q_len) - 1
  n_sink, lo, hi = key_schedule(q_offset + tile_q0, last_q, bk=bk, sinks=sinks, window=window,
                                kv_len=kv_len)
  n_steps = n_sink + hi - lo

  def block_of(step):
    return jnp.where(step < n_sink, step, lo + step - n_sink)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    row0 = tile_q0 + wg * bq  # this warpgroup's first row, relative to q
    first = q_offset + row0  # its first absolute position
    q_tile = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_tile, q_full.at[wg])
    plgpu.barrier_wait(q_full.at[wg])
    c = scale * math.log2(math.e)

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    def step(i, carry, masked: bool):
      acc, m, l = carry
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_full.at[slot])

      def qk_of(acc_ref):
        plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
        if tiles.pingpong:
          take_turn()
        return acc_ref[...]

      s = pl.run_scoped(qk_of, plgpu.ACC((bq, bk), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      s = s * c
      if masked:
        qpos = first + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0,
                                              layout=plgpu.Layout.WGMMA)
        kpos = block_of(i) * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1,
                                                          layout=plgpu.Layout.WGMMA)
        vis = (kpos <= qpos) & (kpos < kv_len)
        if window is not None:
          vis &= (kpos > qpos - window) | (kpos < sinks)
        s = jnp.where(vis, s, HIDDEN)
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p16 = p.astype(dtype)
      if tiles.pingpong:  # softmax done: let the other warpgroup's S = Q K^T go first
        # Keep the softmax before the hand-over (the scheduler may otherwise sink it past
        # the barrier, into the other warpgroup's turn).
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(v_full.at[slot])
        plgpu.barrier_wait(turn)
      else:
        plgpu.barrier_wait(v_full.at[slot])

      if interpret:
        # The GPU interpreter (jax 0.11.2) runs neither pl.run_state nor a wgmma whose A
        # operand is in registers: the same product as a plain dot of the SMEM slot.
        acc = acc + jnp.dot(p16, v_smem.at[slot][...], preferred_element_type=jnp.float32)
      else:  # wgmma with P from registers, accumulating in place
        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    d = q_tile.shape[-1]
    carry = (plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32),
                               plgpu.Layout.WGMMA.reduce(1)),
             plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
    # Blocks [u_lo, u_hi) hide no key from any row of this warpgroup: causal for its first
    # row, inside the window of its last, below kv_len. The sink blocks come first and are
    # masked (they lie below the window range).
    last = first + bq - 1
    u_lo = 0 if window is None else (jnp.maximum(last - window + 1, 0) + bk - 1) // bk
    u_hi = jnp.minimum((first + 1) // bk, kv_len // bk)
    s1 = n_sink + jnp.clip(u_lo, lo, hi) - lo
    s2 = jnp.maximum(n_sink + jnp.clip(u_hi, lo, hi) - lo, s1)
    if tiles.pingpong:  # warpgroup 1 starts half a step behind; 0 balances it at the end
      pl.when(wg == 1)(take_turn)
    carry = lax.fori_loop(0, s1, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(s1, s2, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(s2, n_steps, functools.partial(step, masked=True), carry)
    if tiles.pingpong:
      pl.when(wg == 0)(take_turn)
    seen = m > 0.5 * HIDDEN  # some key was visible to the row
    acc = acc * lax.broadcast_in_dim(jnp.where(seen, 1.0 / l, 0.0), acc.shape, [0])
    q_tile[...] = acc.astype(dtype)
    lse_smem.at[wg][...] = jnp.where(seen, (m + jnp.log2(l)) * math.log(2.0), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(row0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    kv = common.static_lookup(h, kv_heads)

    def load(step, slot):
      rows = pl.ds(block_of(step) * bk, bk)
      keys = (b, kv, rows) if kv_major else (b, rows, kv)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_full.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_full.at[slot])

    for slot in range(stages):
      pl.when(slot < n_steps)(functools.partial(load, slot, slot))

    @pl.loop(0, jnp.maximum(n_steps - stages, 0))
    def _refill(i):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      load(i + stages, slot)

    # Observe the last release of every slot used, so no barrier phase is left unobserved
    # when the scratch is freed.
    for slot in range(stages):
      @pl.when(slot < n_steps)
      def _drain():
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])


def _interpret_params(interpret):
  """None (compile for the GPU), or the GPU interpreter's parameters: `interpret` itself when
  it is an `InterpretGPUParams`, the defaults when True."""
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


def supported(q, k, v, kv_heads, *, q_offset=0, kv_major: bool = False,
              tiles: Tiles = Tiles()) -> bool:
  """Whether this kernel takes the call: Hopper-friendly shapes and dtypes, a non-negative
  offset where it is static (a traced one is the caller's to keep >= 0). With `kv_major` the
  cache length must be a multiple of `tiles.block_kv` (padding would copy the cache)."""
  if not isinstance(q_offset, jax.core.Tracer) and int(q_offset) < 0:
    return False
  d = q.shape[-1]
  if not (q.ndim == 4 and k.ndim == 4 and k.shape == v.shape and k.shape[-1] == d
          and d in (64, 128) and q.dtype == k.dtype == v.dtype
          and q.dtype in (jnp.bfloat16, jnp.float16) and len(kv_heads) == q.shape[2]
          and tiles.block_kv <= 256):
    return False
  kv_total = k.shape[1] if kv_major else k.shape[2]
  if not all(0 <= kv < kv_total for kv in kv_heads):
    return False
  return not kv_major or k.shape[2] % tiles.block_kv == 0


@functools.partial(jax.jit, static_argnames=("kv_heads", "sinks", "window", "kv_major", "tiles",
                                             "interpret"))
def _flash(q, k, v, q_offset, *, kv_heads, sinks, window, kv_major, tiles, interpret):
  b, sq, hq, d = q.shape
  kv_len = k.shape[2] if kv_major else k.shape[1]
  rows = COMPUTE_WGS * tiles.block_q
  sq_pad = -(-sq // rows) * rows
  q = jnp.pad(q, ((0, 0), (0, sq_pad - sq), (0, 0), (0, 0)))
  if not kv_major:
    kv_pad = -(-kv_len // tiles.block_kv) * tiles.block_kv
    k, v = (jnp.pad(x, ((0, 0), (0, kv_pad - kv_len), (0, 0), (0, 0))) for x in (k, v))
  smem = functools.partial(plgpu.SMEM, transforms=(plgpu.TilingTransform((8, 64)),
                                                    plgpu.SwizzleTransform(128)))
  kernel = functools.partial(_kernel, tiles=tiles, kv_heads=kv_heads, sinks=sinks,
                             window=window, q_len=sq, kv_len=kv_len, kv_major=kv_major,
                             scale=1.0 / math.sqrt(d), dtype=q.dtype, interpret=interpret)

  def entry(offset_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
    pl.run_scoped(
        lambda *scratch: kernel(offset_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *scratch),
        smem((COMPUTE_WGS, tiles.block_q, d), q.dtype),
        smem((tiles.stages, tiles.block_kv, d), q.dtype),
        smem((tiles.stages, tiles.block_kv, d), q.dtype),
        plgpu.SMEM((COMPUTE_WGS, tiles.block_q), jnp.float32),
        plgpu.Barrier(num_barriers=tiles.stages),
        plgpu.Barrier(num_barriers=tiles.stages),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=tiles.stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=tiles.stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        collective_axes="wg",
    )

  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, hq, sq_pad), jnp.float32)),
      grid=(hq, sq_pad // rows, b),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )(jnp.reshape(jnp.asarray(q_offset, jnp.int32), (1,)), q, k, v)
  return out[:, :sq], jnp.swapaxes(lse, 1, 2)[:, :sq]


def window_attention(q, k, v, kv_heads, *, sinks: int, window: int, q_offset=0,
                     tiles: Tiles = Tiles(), interpret=False):
  """Sink + sliding-window causal prefill (module docstring); q_offset an int or a traced
  int32 scalar. Returns (out, lse).

  interpret: False (the GPU), True or an `InterpretGPUParams` (the Mosaic GPU interpreter on
  the CPU)."""
  return _flash(q, k, v, q_offset, kv_heads=tuple(int(x) for x in kv_heads), sinks=int(sinks),
                window=int(window), kv_major=False, tiles=tiles, interpret=interpret or False)


def causal_attention(q, k, v, kv_heads, *, q_offset=0, tiles: Tiles = Tiles(),
                     interpret=False):
  """Dense causal prefill with the same kernel. Returns (out, lse)."""
  return _flash(q, k, v, q_offset, kv_heads=tuple(int(x) for x in kv_heads), sinks=0,
                window=None, kv_major=False, tiles=tiles, interpret=interpret or False)


def cache_causal_attention(q, k_cache, v_cache, kv_heads, *, q_offset=0,
                           tiles: Tiles = Tiles(), interpret=False):
  """Dense causal attention of a prefill chunk over a KV cache in place (k_cache, v_cache
  [batch, kv_heads, T, head_dim], T a multiple of `tiles.block_kv`; slots past the chunk's
  last query are never read). Returns (out, lse)."""
  return _flash(q, k_cache, v_cache, q_offset, kv_heads=tuple(int(x) for x in kv_heads),
                sinks=0, window=None, kv_major=True, tiles=tiles, interpret=interpret or False)
