"""Helpers shared by the GPU (Pallas, Triton lowering) kernels.

Conventions of every kernel in this package:
  * arrays are passed whole (no BlockSpec blocking): a program computes its own offsets from
    `pl.program_id`, and block indices travel as ordinary int32 inputs (the Triton lowering
    has no scalar prefetch);
  * tiles that a program loads have power-of-two shapes (a Triton requirement);
  * softmax runs in base 2 (`exp2`, scores pre-multiplied by log2(e)); LSE outputs are
    converted back to natural log, matching `pallas_kernels.reference`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import config

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG_INF = float("-inf")


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def interpret_flag(interpret: bool | None) -> bool:
  """Explicit flag (what the dispatch passes, from its `KernelConfig`), else the process
  default's (`config.default().interpret`, i.e. RTPURBO_INTERPRET read once) for a kernel
  called directly."""
  return config.default().interpret if interpret is None else bool(interpret)


def params(num_warps: int, num_stages: int) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype):
  """bf16/fp16 inputs: tensor cores with fp32 accumulation; fp32 inputs: exact fp32."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_nt(a, b, precision=None):
  """a [m, k] @ b[n, k]^T -> [m, n] float32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def dot_nn(a, b, precision=None):
  """a [m, k] @ b[k, n] -> [m, n] float32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def online_softmax_step(carry, s2, v, vis=None, precision=None):
  """One flash-attention update.

  carry: (acc [m, d] f32, m2 [m] f32 running max in base 2, l [m] f32 running sum).
  s2: [m, n] f32 scores already scaled by scale * log2(e). v: [n, d]. vis: [m, n] bool or
  None (every pair visible). Rows that have seen no visible key keep m2 = -inf, l = 0.
  """
  acc, m2, l = carry
  if vis is not None:
    s2 = jnp.where(vis, s2, NEG_INF)
  m_new = jnp.maximum(m2, jnp.max(s2, axis=1))
  m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
  alpha = jnp.exp2(m2 - m_use)
  p = jnp.exp2(s2 - m_use[:, None])
  l = l * alpha + jnp.sum(p, axis=1)
  acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v, precision)
  return acc, m_new, l


def finish_softmax(acc, m2, l):
  """(out [m, d] f32, lse [m] f32 natural log; 0 and -inf for rows with no visible key)."""
  seen = l > 0.0
  out = acc / jnp.where(seen, l, 1.0)[:, None]
  lse = jnp.where(seen, (m2 + jnp.log2(jnp.where(seen, l, 1.0))) * LN2, NEG_INF)
  return out, lse


def static_lookup(idx, table):
  """table[idx] for a static tuple of ints and a traced int32 scalar `idx`.

  Kernels take no constant arrays, and small index tables passed as inputs cost XLA a
  kernel launch each to materialise; a select chain on the scalar costs nothing.
  """
  out = jnp.int32(table[0])
  for i, val in enumerate(table[1:], 1):
    out = jnp.where(idx == i, jnp.int32(val), out)
  return out


def static_rows(idx, rows, width: int):
  """rows[idx] as an int32 [width] vector (rows: static tuples, padded with their last)."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
  out = jnp.zeros((width,), jnp.int32)
  for i, row in enumerate(rows):
    padded = tuple(row) + (row[-1],) * (width - len(row))
    vec = jnp.zeros((width,), jnp.int32)
    for j, val in enumerate(padded):
      vec = jnp.where(lane == j, jnp.int32(val), vec)
    out = jnp.where(idx == i, vec, out)
  return out


def kv_groups(kv_heads: tuple[int, ...]):
  """Partition query heads by the KV head they read.

  Returns (kv_ids, members): kv_ids[g] is the KV head of group g, members[g] the positions
  (in `kv_heads`) of its query heads; groups in order of first appearance.
  """
  order: dict[int, list[int]] = {}
  for pos, kv in enumerate(kv_heads):
    order.setdefault(int(kv), []).append(pos)
  kv_ids = tuple(order)
  return kv_ids, tuple(tuple(m) for m in order.values())


def full_spec():
  """The whole array as one block (the kernel indexes it itself)."""
  return pl.BlockSpec()
