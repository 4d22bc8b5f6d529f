"""Fused decode selection on TPU: score compressed keys, block masses, exact top-p.

Semantics: `reference.topp_select` (docs/DESIGN.md §1): block masses of the softmax of the
indexer scores over the keys written so far, the shortest prefix of blocks ranked by mass
(ties: lower block index first) whose cumulative mass reaches top_p, plus the own block.

Kernel, per (batch, retrieval head), grid `(batch, heads, key_chunks)`:
  * Scores. The compressed keys `[T, r]` (r = 16 lanes: a poor TPU layout) are viewed, for
    free, as `[T / kpr, 128]` rows of kpr = 128 / r keys. One MXU product with a
    block-diagonal query `[kpr, 128]` gives all scores of a chunk, lane-dense:
    `st[m, i] = score(key i * kpr + m)`.
  * Block masses. `exp(score - running max)` summed over the kpr sublanes and, with a 0/1
    matrix product, over the `block_size / kpr` lanes of each block: one row of block
    masses per key chunk, kept in VMEM and rescaled when the running max grows (online
    softmax). Chunks past the sequence length repeat the last index (no copy) and skip.
  * Selection, at the last chunk, without sorting. With masses m_b normalised to sum 1 and
    G(tau) = sum of the masses strictly above tau, block b has mass G(m_b) (+ equal masses
    of lower index) ranked ahead of it, so exact top-p keeps {b : m_b > tau0} plus the
    lowest-index ties at tau0, where tau0 = min{tau : G(tau) < p}. tau0 is found by
    bisection on the float32 bit pattern (non-negative floats order like their bits:
    31 steps, exact), and the tie cut by a bisection on the block index.
  * The histogram selector (a superset, see `reference.histogram_from_block_logmass`) finds
    its threshold bin by a bisection on the bin index.

`prefill_select` (sparse prefill's selection) is the same kernel with one selection row per
query block. `block_list` turns a mask into the padded block list + count that the sparse
kernels read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import reference as _reference
from pallas_kernels.tpu import LANES, Unsupported, log2

reference = _reference.topp_select
prefill_reference = _reference.prefill_select

MAX_CHUNK_KEYS = 8192  # keys per grid step: [1024, 128] f32 = 512 KiB per buffer
_F32_INF_BITS = 0x7F800000
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Plan:
  t: int  # keys in the cache
  tc: int  # keys per chunk
  kpr: int  # keys per 128-lane row
  bs: int  # block size
  selector: str

  @property
  def rows(self):  # chunks
    return self.t // self.tc

  @property
  def cols(self):  # blocks per chunk
    return self.tc // self.bs

  @property
  def nb(self):
    return self.t // self.bs


def _chunk_keys(t: int, bs: int) -> int | None:
  """Largest multiple of 128 keys (bf16 sublane tiles) that divides t, <= MAX_CHUNK_KEYS."""
  if t <= MAX_CHUNK_KEYS:
    return t
  for tc in range(MAX_CHUNK_KEYS, LANES - 1, -LANES):
    if t % tc == 0 and tc % bs == 0:
      return tc
  return None


def _bits_to_f32(x):
  return jax.lax.bitcast_convert_type(x, jnp.float32)


# Whole-array reductions as two single-axis ones, [R, L] -> [1, 1].
def _total(x):
  return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _peak(x):
  return jnp.max(jnp.max(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _select_exact(mass, blk, valid, top_p, nb: int):
  """Exact top-p over normalised masses (invalid blocks hold 0). Arrays [R, L]; top_p
  [1, 1]."""

  def above(tau):  # mass strictly above tau: [1, 1]
    return _total(jnp.where(mass > tau, mass, 0.0))

  def tau_step(_, lohi):
    lo, hi = lohi
    mid = lo + ((hi - lo) >> 1)
    ok = above(_bits_to_f32(mid)) < top_p
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  zero = jnp.zeros((1, 1), jnp.int32)
  lo, _ = jax.lax.fori_loop(0, 31, tau_step, (zero, zero + _F32_INF_BITS))
  tau0 = _bits_to_f32(lo)
  g0 = above(tau0)
  tie = valid & (mass == tau0)

  # Ties at tau0 are taken in index order while the mass ranked ahead stays below p:
  # x* = smallest x with g0 + tau0 * #{ties below x} >= p; keep the ties below x*.
  def cut_step(_, lohi):
    lo, hi = lohi
    mid = lo + ((hi - lo) >> 1)
    ahead = _total(jnp.where(tie & (blk < mid), 1.0, 0.0))
    stop = g0 + tau0 * ahead >= top_p
    return jnp.where(stop, lo, mid + 1), jnp.where(stop, mid, hi)

  steps = max(1, int(nb).bit_length())
  cut, _ = jax.lax.fori_loop(0, steps, cut_step, (zero, zero + nb))
  return valid & ((mass > tau0) | (tie & (blk < cut)))


def _select_histogram(mass, valid, top_p):
  """The histogram selector's kept set (without the own block). Arrays [R, L]."""
  bins, span = _reference.HIST_BINS, _reference.HIST_RANGE
  lm = jnp.where(valid & (mass > 0), jnp.log(jnp.where(mass > 0, mass, 1.0)), -jnp.inf)
  mx = _peak(lm)
  rel = jnp.clip((lm - mx + span) / span, 0.0, 1.0)
  bin_id = jnp.clip(jnp.floor(rel * bins).astype(jnp.int32), 0, bins - 1)
  target = top_p * (1.0 - 1e-6)

  # threshold = largest i with (mass in bins >= i) >= target; that mass only shrinks with i.
  def step(_, lohi):
    lo, hi = lohi
    mid = lo + ((hi - lo + 1) >> 1)
    ok = _total(jnp.where(valid & (bin_id >= mid), mass, 0.0)) >= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  zero = jnp.zeros((1, 1), jnp.int32)
  thr, _ = jax.lax.fori_loop(0, 9, step, (zero, zero + bins - 1))
  return valid & (bin_id >= thr)


def _kernel(lengths_ref, p_ref, q_ref, x_ref, *refs, plan: _Plan, offset: bool):
  off_ref, (out_ref, mass_sc, max_sc) = (refs[0], refs[1:]) if offset else (None, refs)
  bi, c = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[bi]

  @pl.when(c == 0)
  def _init():
    mass_sc[...] = jnp.zeros(mass_sc.shape, jnp.float32)
    max_sc[...] = jnp.full(max_sc.shape, -jnp.inf, jnp.float32)

  @pl.when(c * plan.tc < length)
  def _chunk():
    x = x_ref[...].astype(jnp.float32)  # [tc / kpr, 128]
    st = jax.lax.dot_general(q_ref[...], x, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                             preferred_element_type=jnp.float32)  # [kpr, tc / kpr]
    key = (c * plan.tc + jax.lax.broadcasted_iota(jnp.int32, st.shape, 1) * plan.kpr
           + jax.lax.broadcasted_iota(jnp.int32, st.shape, 0))
    ok = key < length
    m_old = max_sc[...]
    m_new = jnp.maximum(m_old, _peak(jnp.where(ok, st, -jnp.inf)))
    e = jnp.where(ok, jnp.exp(st - m_new), 0.0)
    per = log2(plan.bs // plan.kpr)  # log2 of the lanes per block
    seg = (jax.lax.broadcasted_iota(jnp.int32, (plan.tc // plan.kpr, plan.cols), 0) >> per
           == jax.lax.broadcasted_iota(jnp.int32, (plan.tc // plan.kpr, plan.cols), 1))
    row = jnp.sum(jax.lax.dot_general(e, seg.astype(jnp.float32), (((1,), (0,)), ((), ())),
                                      precision=_HIGHEST, preferred_element_type=jnp.float32),
                  axis=0, keepdims=True)  # [1, cols]
    # m_old is -inf before the first chunk: exp(-inf) = 0 clears nothing that matters.
    mass_sc[...] = mass_sc[...] * jnp.exp(m_old - m_new)
    mass_sc[pl.ds(c, 1), :] = row
    max_sc[...] = m_new

  @pl.when(c == plan.rows - 1)
  def _select():
    shape = (plan.rows, plan.cols)
    blk = (jax.lax.broadcasted_iota(jnp.int32, shape, 0) * plan.cols
           + jax.lax.broadcasted_iota(jnp.int32, shape, 1))
    valid = blk * plan.bs < length
    mass = mass_sc[...]
    if off_ref is not None:
      # A log-mass offset per block multiplies its mass; shifted by its largest valid value
      # so that no factor overflows (the masses are normalised next).
      off = jnp.where(valid, off_ref[...].astype(jnp.float32), -jnp.inf)
      mass = mass * jnp.exp(off - _peak(off))
    mass = jnp.where(valid, mass, 0.0)
    total = _total(mass)
    mass = mass / jnp.where(total > 0, total, 1.0)
    own = valid & (blk == (length - 1) // plan.bs)
    top_p = p_ref[...]  # [1, 1]
    if plan.selector == "histogram":
      keep = _select_histogram(mass, valid, top_p)
    else:
      keep = _select_exact(mass, blk, valid, top_p, plan.nb)
    keep = jnp.where(top_p >= 1.0, valid, keep)  # p >= 1: every causal block, exactly dense
    out_ref[...] = (keep | own).astype(jnp.int32)


def _block_diagonal_query(qi, kpr: int):
  """[b, h, r] -> [b, h, kpr, 128] with row m holding q in lanes m*r .. m*r + r - 1."""
  b, h, r = qi.shape
  eye = jnp.eye(kpr, dtype=jnp.float32)
  return jnp.einsum("mn,bhr->bhmnr", eye, qi.astype(jnp.float32)).reshape(b, h, kpr, kpr * r)


def unsupported(t: int, r: int, block_size: int) -> str | None:
  """Why the selection kernel does not tile T = t keys of r dims in blocks of block_size
  (`topp_select`: the cache length; `prefill_select`: S), or None."""
  if LANES % r or t % block_size or block_size % (LANES // r) or block_size & (block_size - 1):
    return f"topp_select: r={r}, T={t}, block_size={block_size} do not tile"
  if _chunk_keys(t, block_size) is None:
    return f"topp_select: T={t} has no chunk size that is a multiple of {LANES}"
  return None


def _plan(t: int, r: int, block_size: int, selector: str) -> _Plan:
  if selector not in ("exact", "histogram"):
    raise ValueError(f"selector={selector!r}: expected 'exact' or 'histogram'")
  if why := unsupported(t, r, block_size):
    raise Unsupported(why)
  return _Plan(t=t, tc=_chunk_keys(t, block_size), kpr=LANES // r, bs=block_size,
               selector=selector)


def _select(plan: _Plan, qi, x, lengths, top_p, *, key_rows: int, interpret,
            block_offset=None):
  """The selection kernel. qi: [rows, h, r]; x: [rows / key_rows, h, T / kpr, 128] (row i
  scores the keys of x[i // key_rows]); lengths: [rows]; block_offset: optional
  [rows, h, nb] log-mass offsets. Returns bool [rows, h, nb]."""
  n, h, _ = qi.shape
  qbd = _block_diagonal_query(qi, plan.kpr)
  whole = pl.BlockSpec((None, None, plan.rows, plan.cols), lambda bi, hi, c, L: (bi, hi, 0, 0))
  extra_specs, extra = [], []
  if block_offset is not None:
    extra_specs = [whole]
    extra = [block_offset.astype(jnp.float32).reshape(n, h, plan.rows, plan.cols)]

  def x_map(bi, hi, c, lengths_ref):
    # Past the sequence end, repeat the last useful chunk: the pipeline skips the copy.
    last = jnp.maximum(lengths_ref[bi] - 1, 0) // plan.tc
    return bi // key_rows, hi, jnp.minimum(c, last), 0

  mask = pl.pallas_call(
      functools.partial(_kernel, plan=plan, offset=block_offset is not None),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(n, h, plan.rows),
          in_specs=[pl.BlockSpec((1, 1), lambda bi, hi, c, L: (0, 0)),
                    pl.BlockSpec((None, None, plan.kpr, LANES),
                                 lambda bi, hi, c, L: (bi, hi, 0, 0)),
                    pl.BlockSpec((None, None, plan.tc // plan.kpr, LANES), x_map),
                    *extra_specs],
          out_specs=whole,
          scratch_shapes=[pltpu.VMEM((plan.rows, plan.cols), jnp.float32),
                          pltpu.VMEM((1, 1), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((n, h, plan.rows, plan.cols), jnp.int32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="rtpurbo_topp_select",
  )(lengths.astype(jnp.int32), jnp.reshape(jnp.asarray(top_p, jnp.float32), (1, 1)), qbd, x,
    *extra)
  return mask.reshape(n, h, plan.nb) != 0


@functools.partial(jax.jit, static_argnames=("block_size", "selector", "interpret"))
def topp_select(qi, ckeys, lengths, *, top_p, block_size: int = 64,
                selector: str = "exact", block_offset=None, interpret=False):
  """The `reference.topp_select` contract on TPU.

  Args:
    qi: [batch, r_heads, r]; ckeys: [batch, r_heads, T, r]; lengths: [batch] int32.
    top_p: a float or a traced scalar (one compiled kernel serves every p).
    block_offset: optional [batch, r_heads, T // block_size] added to the block log-masses
      (the indexer's distance bias): each block's mass is multiplied by exp(offset).
    Needs 128 % r == 0, T % block_size == 0 and block_size % (128 / r) == 0.
  Returns: bool [batch, r_heads, T // block_size].
  """
  b, h, t, r = ckeys.shape
  if qi.shape != (b, h, r) or lengths.shape != (b,):
    raise ValueError(f"topp_select: qi {qi.shape} / lengths {lengths.shape} do not match "
                     f"ckeys {ckeys.shape}")
  plan = _plan(t, r, block_size, selector)
  x = ckeys.reshape(b, h, t // plan.kpr, LANES)  # free: rows of kpr consecutive keys
  if block_offset is not None and block_offset.shape != (b, h, plan.nb):
    raise ValueError(f"topp_select: block_offset {block_offset.shape}, expected "
                     f"{(b, h, plan.nb)}")
  return _select(plan, qi, x, lengths, top_p, key_rows=1, interpret=interpret,
                 block_offset=block_offset)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def prefill_select(qi, ki, *, top_p, block_size: int = 64, interpret=False):
  """The `reference.prefill_select` contract on TPU: query block i is one selection row.

  Row (batch, i) scores the keys of its batch row with the block's mean indexer query, over
  the keys before the end of block i (length (i + 1) * block_size), own block i: the decode
  selection kernel with several query rows per key row.
  Args: qi, ki: [batch, S, r_heads, r], S % block_size == 0.
  Returns: bool [batch, r_heads, S / block_size (query blocks), S / block_size (key blocks)].
  """
  b, s, h, r = qi.shape
  if ki.shape != qi.shape or s % block_size:
    raise ValueError(f"prefill_select: qi {qi.shape}, ki {ki.shape} (block_size={block_size})")
  plan = _plan(s, r, block_size, "exact")
  nq = s // block_size
  pooled = qi.astype(jnp.float32).reshape(b, nq, block_size, h, r).mean(axis=2)
  x = jnp.swapaxes(ki, 1, 2).reshape(b, h, s // plan.kpr, LANES)
  lengths = jnp.tile((jnp.arange(nq, dtype=jnp.int32) + 1) * block_size, b)
  mask = _select(plan, pooled.reshape(b * nq, h, r), x, lengths, top_p, key_rows=nq,
                 interpret=interpret)
  return jnp.swapaxes(mask.reshape(b, nq, h, plan.nb), 1, 2)


def block_list(mask, max_blocks: int | None = None):
  """Compact a block mask into the form the sparse kernels read.

  Args:
    mask: bool [..., nb]. max_blocks: static list length (default nb, never truncates).
  Returns: blocks int32 [..., max_blocks] (selected block indices ascending; the slots past
    the count repeat the last selected index, so a pipeline re-fetches nothing; 0 when
    nothing is selected) and count int32 [...] (capped at max_blocks).
  """
  nb = mask.shape[-1]
  max_blocks = nb if max_blocks is None else max_blocks
  # Selected blocks first, in index order: a stable sort on "not selected".
  order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
  if max_blocks > nb:
    order = jnp.pad(order, [(0, 0)] * (mask.ndim - 1) + [(0, max_blocks - nb)])
  order = order[..., :max_blocks]
  count = jnp.minimum(jnp.sum(mask, axis=-1, dtype=jnp.int32), max_blocks)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  slot = jnp.arange(max_blocks, dtype=jnp.int32)
  return jnp.where(slot < count[..., None], order, last), count


def topp_select_blocks(qi, ckeys, lengths, *, top_p: float, block_size: int = 64,
                       selector: str = "exact", max_blocks: int | None = None,
                       interpret=False):
  """Selection plus its padded block list: (mask [b, h, nb], blocks [b, h, max_blocks],
  count [b, h]). `max_blocks` is the static budget (default nb: exact)."""
  mask = topp_select(qi, ckeys, lengths, top_p=top_p, block_size=block_size,
                     selector=selector, interpret=interpret)
  blocks, count = block_list(mask, max_blocks)
  return mask, blocks, count
