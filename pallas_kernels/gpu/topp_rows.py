"""Block top-p selection per row of block log-masses (exact or histogram), in registers.

Input rows are block log-masses `lm [rows, n]` with the first `n_valid[row]` blocks valid
and `own[row]` the block that is always kept. One program per row holds the whole row
(n <= MAX_WIDTH) and never sorts:

  exact      the reference keeps the blocks ranked (by mass, ties: lower index first)
             before the point where the cumulative mass first reaches p. With masses
             m >= 0, F(x) = sum of masses whose float32 bit pattern is >= x is monotone in
             x, and the last kept block has mass v* = the largest x with F(x) >= p. A
             31-step bisection over bit patterns finds it; blocks above v* are kept, and
             blocks equal to v* are kept in index order while S(> v*) + v* * (equal ones
             ahead) < p. If the total mass is below p every valid block is kept.
  histogram  `reference.histogram_from_block_logmass`: 256 bins of log-mass; the threshold
             bin is the highest t with mass(bins >= t) >= p (1 - 1e-6), found by an
             8-step bisection over t.

Both agree with the reference up to float32 summation order (a cumulative sum within
~1e-6 of p may fall either way).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import reference as ref
from pallas_kernels.gpu import common

MAX_WIDTH = 32768
ONE_BITS = 0x3F800000  # float32 1.0: no block mass exceeds it

__all__ = ["select_rows", "select_rows_decode", "reference", "MAX_WIDTH", "SEARCHES"]


def reference(lm, n_valid, own, *, top_p: float, selector: str = "exact"):
  """jnp oracle on the same interface (see `pallas_kernels.reference`)."""
  valid = jnp.arange(lm.shape[-1])[None, :] < n_valid[:, None]
  return ref.SELECTORS[selector](lm, valid, own, top_p)


SEARCHES = ("bisect", "quad")  # the exact selector's threshold search (same result)


def _kernel(lm_ref, nvalid_ref, own_ref, out_ref, *, n, width, top_p, selector, bins, span,
            lengths_of, search):
  r = pl.program_id(0)
  idx = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
  if lengths_of is None:
    n_valid, own = nvalid_ref[r], own_ref[r]
  else:  # decode rows: nvalid_ref holds lengths [batch]; row r belongs to batch r // heads
    heads, bs = lengths_of
    length = nvalid_ref[r // heads]
    n_valid, own = (length + bs - 1) // bs, (length - 1) // bs
  valid = idx < jnp.minimum(n_valid, n)
  x = plgpu.load(lm_ref.at[r, pl.ds(0, width)], mask=valid, other=common.NEG_INF)
  x = jnp.where(valid, x, common.NEG_INF)
  mx = jnp.max(x)
  mx_safe = jnp.where(mx == common.NEG_INF, 0.0, mx)
  e = jnp.where(valid, jnp.exp(x - mx_safe), 0.0)
  mass = e / jnp.sum(e)

  def mass_from(pred):
    return jnp.sum(jnp.where(valid & pred, mass, 0.0))

  if top_p >= 1.0:
    keep = valid
  elif selector == "exact":
    bits = jax.lax.bitcast_convert_type(mass, jnp.int32)

    # Invariant: F(lo) >= p > F(hi) with F(x) the mass of blocks whose bits are >= x (F is
    # monotone as computed too: the same reduction of more non-negative terms); it ends with
    # hi = lo + 1, lo = v*. "quad" tests three thresholds per round (independent reductions)
    # and needs 15 rounds where "bisect" needs 31 dependent ones; both find the same v*.
    def bisect(_, lohi):
      lo, hi = lohi
      mid = lo + (hi - lo) // 2
      ok = mass_from(bits >= mid) >= top_p
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    def quad(_, lohi):
      lo, hi = lohi
      m1, m2 = lo + (hi - lo) // 4, lo + (hi - lo) // 2
      m3 = m2 + (hi - m2) // 2
      f1, f2, f3 = (mass_from(bits >= m) >= top_p for m in (m1, m2, m3))
      new_lo = jnp.where(f3, m3, jnp.where(f2, m2, jnp.where(f1, m1, lo)))
      new_hi = jnp.where(f3, hi, jnp.where(f2, m3, jnp.where(f1, m2, m1)))
      return new_lo, new_hi

    step, rounds = (bisect, 31) if search == "bisect" else (quad, 15)
    lo, _ = jax.lax.fori_loop(0, rounds, step, (jnp.int32(0), jnp.int32(ONE_BITS + 1)))
    above = valid & (bits > lo)
    tie = valid & (bits == lo)
    tie_i = tie.astype(jnp.int32)
    ahead = (jnp.cumsum(tie_i) - tie_i).astype(jnp.float32)
    keep_tie = tie & (mass_from(bits > lo) + mass * ahead < top_p)
    reach_all = mass_from(bits >= 0) < top_p
    keep = (above | keep_tie | reach_all) & valid
  else:  # histogram
    rel = jnp.clip((x - mx + span) / span, 0.0, 1.0)
    bin_id = jnp.clip(jnp.floor(rel * bins).astype(jnp.int32), 0, bins - 1)
    target = top_p * (1.0 - 1e-6)

    def bisect(_, lohi):
      lo, hi = lohi
      mid = lo + (hi - lo) // 2
      ok = mass_from(bin_id >= mid) >= target
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    steps = max(1, (bins - 1).bit_length())
    thr, _ = jax.lax.fori_loop(0, steps, bisect, (jnp.int32(0), jnp.int32(bins)))
    keep = valid & (bin_id >= thr)
  keep = keep | (valid & (idx == own))
  plgpu.store(out_ref.at[r, pl.ds(0, width)], keep.astype(jnp.int8), mask=idx < n)


def _warps(width: int) -> int:
  return int(min(16, max(4, width // 1024)))


@functools.partial(jax.jit, static_argnames=("top_p", "selector", "lengths_of", "search",
                                             "num_warps", "interpret"))
def _select(lm, n_valid, own, *, top_p, selector, lengths_of, search, num_warps, interpret):
  rows, n = lm.shape
  width = common.next_pow2(n)
  kernel = functools.partial(_kernel, n=n, width=width, top_p=float(top_p), selector=selector,
                             bins=ref.HIST_BINS, span=ref.HIST_RANGE, lengths_of=lengths_of,
                             search=search)
  out = pl.pallas_call(
      kernel,
      grid=(rows,),
      in_specs=[common.full_spec(), common.full_spec(),
                None if own is None else common.full_spec()],
      out_specs=common.full_spec(),
      out_shape=jax.ShapeDtypeStruct((rows, n), jnp.int8),
      compiler_params=common.params(num_warps or _warps(width), 1),
      interpret=interpret,
      name=f"topp_rows_{selector}",
  )(lm.astype(jnp.float32), n_valid.astype(jnp.int32),
    None if own is None else own.astype(jnp.int32))
  return out != 0


def _check(n, selector, search, num_warps):
  if n > MAX_WIDTH:
    raise ValueError(f"select_rows: row width {n} exceeds {MAX_WIDTH}")
  if selector not in ref.SELECTORS:
    raise ValueError(f"select_rows: selector={selector!r}, expected one of {list(ref.SELECTORS)}")
  if search not in SEARCHES:
    raise ValueError(f"select_rows: search={search!r}, expected one of {SEARCHES}")
  if num_warps is not None and num_warps not in (1, 2, 4, 8, 16, 32):
    raise ValueError(f"select_rows: num_warps={num_warps}, expected a power of two <= 32")


def select_rows(lm, n_valid, own, *, top_p: float, selector: str = "exact",
                search: str = "bisect", num_warps: int | None = None,
                interpret: bool | None = None):
  """lm [..., n] f32; n_valid, own [...] int32 -> keep bool [..., n]. n <= MAX_WIDTH.
  search: the exact selector's threshold search (SEARCHES; the same result); num_warps:
  None sizes the program by the row width."""
  *lead, n = lm.shape
  _check(n, selector, search, num_warps)
  out = _select(lm.reshape(-1, n), n_valid.reshape(-1), own.reshape(-1), top_p=float(top_p),
                selector=selector, lengths_of=None, search=search, num_warps=num_warps,
                interpret=common.interpret_flag(interpret))
  return out.reshape(*lead, n)


def select_rows_decode(lm, lengths, *, block_size: int, top_p: float, selector: str = "exact",
                       search: str = "bisect", num_warps: int | None = None,
                       interpret: bool | None = None):
  """Decode rows: lm [batch, heads, n]; row (b, h) has cdiv(lengths[b], block_size) valid
  blocks and own block (lengths[b] - 1) // block_size, computed in the kernel."""
  b, h, n = lm.shape
  _check(n, selector, search, num_warps)
  out = _select(lm.reshape(-1, n), lengths, None, top_p=float(top_p), selector=selector,
                lengths_of=(h, block_size), search=search, num_warps=num_warps,
                interpret=common.interpret_flag(interpret))
  return out.reshape(b, h, n)
