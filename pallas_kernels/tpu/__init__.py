"""TPU kernels (Pallas, Mosaic lowering) for RTPurbo attention.

Each module holds its kernel(s) and, as `reference`, the jnp oracle it must reproduce (from
`pallas_kernels.reference`). `dispatch` exposes them to `pallas_kernels.ops` with the
reference signatures. Kernels take `interpret=` (False for Mosaic, or a
`pltpu.InterpretParams` to run in the TPU interpreter on CPU).

The helpers below are the pieces every attention kernel here shares: row statistics kept
lane-replicated as `[rows, 128]` (the layout Mosaic handles best) and the online-softmax
update / finish on VMEM scratch refs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LANES = 128


class Unsupported(ValueError):
  """A shape the TPU kernel does not tile, raised by a kernel called on one. The dispatch asks
  each kernel module's `unsupported` (the same check) first and runs the reference there."""


def widen(x, n: int):
  """A lane-replicated `[rows, 128]` array as `[rows, n]`."""
  if n == LANES:
    return x
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  raise Unsupported(f"row width {n} is neither < 128 nor a multiple of 128")


def lane_width_ok(n: int) -> bool:
  return n % LANES == 0 or n < LANES


def log2(n: int) -> int:
  """Exact log2 of a power of two (shifts instead of vector integer division)."""
  if n < 1 or n & (n - 1):
    raise Unsupported(f"{n} is not a power of two")
  return n.bit_length() - 1


def init_softmax(m_sc, l_sc, acc_sc):
  m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
  l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
  acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def softmax_step(s, load_v, m_sc, l_sc, acc_sc):
  """One online-softmax update.

  s: [rows, n] float32 scores, -inf where a key is invisible. load_v: () -> [n, d] values
  (called after the score math, so a kernel can wait for the V copy late). m_sc, l_sc:
  [rows, 128] running max / denominator; acc_sc: [rows, d] unnormalised output.
  """
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jax.lax.broadcast_in_dim(jnp.max(s, axis=1), m_prev.shape, (0,)))
  # A row with nothing visible yet keeps m = -inf; subtract 0 there so exp gives 0, not nan.
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - widen(m_safe, s.shape[1]))
  alpha = jnp.exp(m_prev - m_safe)
  l_sc[...] = alpha * l_sc[...] + jax.lax.broadcast_in_dim(jnp.sum(p, axis=1), m_prev.shape,
                                                           (0,))
  m_sc[...] = m_new
  v = load_v()
  pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
  acc_sc[...] = widen(alpha, acc_sc.shape[1]) * acc_sc[...] + pv


def finish_softmax(m_sc, l_sc, acc_sc, o_ref):
  """Write out = acc / l (zeros where nothing was visible); return lse [rows, 128]
  (-inf there)."""
  l = l_sc[...]
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  d = acc_sc.shape[1]
  o_ref[...] = jnp.where(widen(seen, d), acc_sc[...] / widen(l_safe, d), 0.0).astype(o_ref.dtype)
  return jnp.where(seen, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def nt_dot(a, b):
  """a [m, k] . b [n, k]^T -> [m, n] float32 (the q k^T form the MXU takes directly)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
