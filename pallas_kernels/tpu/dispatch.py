"""TPU entry points for `pallas_kernels.ops` (backend "tpu"): Mosaic kernels.

Each operation's function takes the reference's arguments plus `kernels` (the `KernelConfig`)
and returns the kernel call for them (a zero-argument callable), or None where the kernel
does not take them (the jnp reference then runs): a shape it does not tile (the kernel
module's `unsupported`, the same check the kernel raises `Unsupported` on) or a q_offset that
is traced where the kernel needs a static one. Inconsistent inputs still raise `ValueError`
from the kernel. With `kernels.interpret` the kernels run in the TPU interpreter (CPU tests);
`kernels.detect_races` also turns on its race detector. The chunk-offset operations
(`cache_*`) have no Mosaic kernels here.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.config import KernelConfig
from pallas_kernels.tpu import ring_decode as _ring
from pallas_kernels.tpu import sparse_decode as _decode
from pallas_kernels.tpu import sparse_prefill as _prefill
from pallas_kernels.tpu import topp_select as _topp
from pallas_kernels.tpu import window_attention as _window


def interpret_params(kernels: KernelConfig):
  """False (compile with Mosaic) or the interpreter's parameters."""
  if not kernels.interpret:
    return False
  return pltpu.InterpretParams(detect_races=kernels.detect_races)


def _static(q_offset) -> bool:
  """The kernel compiles q_offset in (a static argument): a traced one does not go."""
  return not isinstance(q_offset, jax.core.Tracer)


def causal_attention(q, k, v, kv_heads, *, q_offset=0, chunk: int = 512,
                     kernels: KernelConfig):
  del chunk  # the reference's memory knob; the kernel tiles on its own
  if not _static(q_offset) or _window.unsupported(q):
    return None
  return functools.partial(_window.causal_attention, q, k, v, tuple(kv_heads),
                           q_offset=int(q_offset), interpret=interpret_params(kernels))


def window_attention(q, k, v, kv_heads, *, sinks: int, window: int, q_offset=0,
                     chunk: int = 512, kernels: KernelConfig):
  del chunk
  if not _static(q_offset) or _window.unsupported(q):
    return None
  return functools.partial(_window.window_attention, q, k, v, tuple(kv_heads), sinks=sinks,
                           window=window, q_offset=int(q_offset),
                           interpret=interpret_params(kernels))


def topp_select(qi, ckeys, lengths, *, top_p: float, block_size: int = 64,
                selector: str = "exact", block_offset=None, kernels: KernelConfig):
  if _topp.unsupported(ckeys.shape[2], ckeys.shape[3], block_size):
    return None
  return functools.partial(_topp.topp_select, qi, ckeys, lengths, top_p=top_p,
                           block_size=block_size, selector=selector, block_offset=block_offset,
                           interpret=interpret_params(kernels))


def prefill_select(qi, ki, *, top_p: float, block_size: int = 64, kernels: KernelConfig):
  if _topp.unsupported(qi.shape[1], qi.shape[3], block_size):
    return None
  return functools.partial(_topp.prefill_select, qi, ki, top_p=top_p, block_size=block_size,
                           interpret=interpret_params(kernels))


def sparse_decode(q, k_cache, v_cache, kv_heads, block_mask, lengths, *, block_size: int = 64,
                  kernels: KernelConfig):
  if _decode.unsupported(q, k_cache, block_size):
    return None
  return functools.partial(_decode.sparse_decode, q, k_cache, v_cache, tuple(kv_heads),
                           block_mask, lengths, block_size=block_size,
                           interpret=interpret_params(kernels))


def ring_decode(q, ring_k, ring_v, ring_pos, kv_heads, q_pos, *, sinks: int, window: int,
                sparse_active=None, kernels: KernelConfig):
  if _ring.unsupported(q, ring_k):
    return None
  return functools.partial(_ring.ring_decode, q, ring_k, ring_v, ring_pos, tuple(kv_heads),
                           q_pos, sinks=sinks, window=window, sparse_active=sparse_active,
                           interpret=interpret_params(kernels))


def sparse_prefill(q, k, v, kv_heads, block_mask, *, block_size: int = 64, chunk: int = 512,
                   kernels: KernelConfig):
  del chunk
  if _prefill.unsupported(q, block_size):
    return None
  return functools.partial(_prefill.sparse_prefill, q, k, v, tuple(kv_heads), block_mask,
                           block_size=block_size, interpret=interpret_params(kernels))
