"""TPU entry points for `pallas_kernels.ops`: the reference signatures, Mosaic kernels.

Each function returns `NotImplemented` for a shape its kernel does not tile (the jnp
reference then runs) and raises `ValueError` for inconsistent inputs. With
`RTPURBO_INTERPRET=1` the kernels run in the TPU interpreter (CPU tests);
`RTPURBO_INTERPRET=races` also turns on its race detector.
"""

from __future__ import annotations

import os

from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import ops
from pallas_kernels.tpu import Unsupported
from pallas_kernels.tpu import ring_decode as _ring
from pallas_kernels.tpu import sparse_decode as _decode
from pallas_kernels.tpu import sparse_prefill as _prefill
from pallas_kernels.tpu import topp_select as _topp
from pallas_kernels.tpu import window_attention as _window


def interpret_params():
  """False (compile with Mosaic) or the interpreter's parameters."""
  if not ops.interpret():
    return False
  races = os.environ.get("RTPURBO_INTERPRET", "").lower() == "races"
  return pltpu.InterpretParams(detect_races=races)


def _call(fn, *args, **kwargs):
  try:
    return fn(*args, interpret=interpret_params(), **kwargs)
  except Unsupported:
    return NotImplemented


def causal_attention(q, k, v, kv_heads, *, q_offset: int = 0, chunk: int = 512):
  del chunk  # the reference's memory knob; the kernel tiles on its own
  return _call(_window.causal_attention, q, k, v, tuple(kv_heads), q_offset=q_offset)


def window_attention(q, k, v, kv_heads, *, sinks: int, window: int, q_offset: int = 0,
                     chunk: int = 512):
  del chunk
  return _call(_window.window_attention, q, k, v, tuple(kv_heads), sinks=sinks, window=window,
               q_offset=q_offset)


def topp_select(qi, ckeys, lengths, *, top_p: float, block_size: int = 64,
                selector: str = "exact"):
  return _call(_topp.topp_select, qi, ckeys, lengths, top_p=top_p, block_size=block_size,
               selector=selector)


def prefill_select(qi, ki, *, top_p: float, block_size: int = 64):
  return _call(_topp.prefill_select, qi, ki, top_p=top_p, block_size=block_size)


def sparse_decode(q, k_cache, v_cache, kv_heads, block_mask, lengths, *, block_size: int = 64):
  return _call(_decode.sparse_decode, q, k_cache, v_cache, tuple(kv_heads), block_mask,
               lengths, block_size=block_size)


def ring_decode(q, ring_k, ring_v, ring_pos, kv_heads, q_pos, *, sinks: int, window: int,
                sparse_active=None):
  return _call(_ring.ring_decode, q, ring_k, ring_v, ring_pos, tuple(kv_heads), q_pos,
               sinks=sinks, window=window, sparse_active=sparse_active)


def sparse_prefill(q, k, v, kv_heads, block_mask, *, block_size: int = 64, chunk: int = 512):
  del chunk
  return _call(_prefill.sparse_prefill, q, k, v, tuple(kv_heads), block_mask,
               block_size=block_size)
