"""GPU entry points for `pallas_kernels.ops` (backend "gpu").

Each function has the reference's signature and returns `NotImplemented` for inputs it
does not handle (the jnp reference then runs). Choices, measured on an H200
(benchmarks/NOTES.md):
  causal_attention   cuDNN flash attention; Pallas flash kernel where cuDNN does not apply
                     (q_offset != 0 or traced, fp32) or in interpret mode.
  window_attention   WINDOW_IMPL: "cudnn_chunked" (two causal cuDNN calls over window-sized
                     chunks + LSE-merged sinks), "cudnn" (cuDNN's sliding-window mask) or
                     "pallas" (one flash kernel with the sink + window rule); the Pallas
                     kernel also wherever q_offset is not a static 0.
A traced q_offset (a jitted chunked prefill whose offset changes per chunk) goes to the
Pallas flash kernel, which reads the offset at run time; cuDNN takes no offset.
  cache_causal_attention  a prefill chunk over the KV cache in place ([b, kv, T, d]):
                     the Pallas flash kernel (kv_major) or, with RTPURBO_CACHE_ATTN=cudnn,
                     a cuDNN prefix call (padding mask) + a causal call on the chunk.
  topp_select        block-LSE kernel + register top-p kernel (exact or histogram).
  sparse_decode      mask -> block lists, split-KV decode kernel.
  ring_decode        visible ring blocks -> block list, same decode kernel (GQA-grouped).
  prefill_select     pooled block-LSE tile kernel + register top-p kernel; the cache_
                     variant reads the compressed-key cache at a runtime chunk offset.
  sparse_prefill     mask -> block lists, block-sparse flash kernel; the cache_ variant
                     reads the KV cache in place at a runtime chunk offset.
Interpret mode (`RTPURBO_INTERPRET=1`) runs every Pallas kernel on the CPU; cuDNN is skipped.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from pallas_kernels.gpu import common
from pallas_kernels.gpu import cudnn_attention as cudnn
from pallas_kernels.gpu import decode as decode_k
from pallas_kernels.gpu import prefill_select as prefill_select_k
from pallas_kernels.gpu import sparse_prefill as sparse_prefill_k
from pallas_kernels.gpu import topp_select as topp_select_k
from pallas_kernels.gpu import window_attention as flash_k

# Set from the H200 measurements (benchmarks/NOTES.md): the faster of the two.
WINDOW_IMPL = "cudnn"


def cache_attn_impl() -> str:
  """`cache_causal_attention` implementation: RTPURBO_CACHE_ATTN=pallas (default: the flash
  kernel reading the cache in place at a traced offset) or cudnn (prefix call with a padding
  mask + causal call on the chunk, merged by LSE; `benchmarks/check_prefill.py` measures both).
  """
  choice = os.environ.get("RTPURBO_CACHE_ATTN", "pallas").lower()
  if choice not in ("pallas", "cudnn"):
    raise ValueError(f"RTPURBO_CACHE_ATTN={choice!r}: expected pallas or cudnn")
  return choice


def _pallas_ok() -> bool:
  """Pallas Triton kernels can run: on a CUDA device, or in the interpreter."""
  return common.interpret_flag(None) or jax.default_backend() in ("gpu", "cuda")


def _cudnn_ok() -> bool:
  return not common.interpret_flag(None) and jax.default_backend() in ("gpu", "cuda")


def _static_zero(q_offset) -> bool:
  """q_offset is a concrete 0 (a traced scalar is never: its value is unknown here)."""
  try:
    return int(q_offset) == 0
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    return False


def causal_attention(q, k, v, kv_heads, *, q_offset=0, chunk: int = 512):
  kv_heads = tuple(int(x) for x in kv_heads)
  if _cudnn_ok() and _static_zero(q_offset) and cudnn.supported(q, k, v, kv_heads):
    return cudnn.causal_attention(q, k, v, kv_heads)
  if _pallas_ok() and flash_k.supported(q, k, v, kv_heads):
    return flash_k.causal_attention(q, k, v, kv_heads, q_offset=q_offset)
  return NotImplemented


def cache_causal_attention(q, k_cache, v_cache, kv_heads, *, q_offset=0, chunk: int = 512):
  kv_heads = tuple(int(x) for x in kv_heads)
  d = q.shape[-1]
  if (cache_attn_impl() == "cudnn" and _cudnn_ok() and d % 8 == 0 and d <= 256
      and q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
      and k_cache.shape == v_cache.shape and k_cache.shape[-1] == d):
    return cudnn.cache_causal_attention(q, k_cache, v_cache, kv_heads, q_offset=q_offset)
  if _pallas_ok() and flash_k.supported(q, k_cache, v_cache, kv_heads, kv_major=True):
    return flash_k.causal_attention(q, k_cache, v_cache, kv_heads, q_offset=q_offset,
                                    kv_major=True)
  return NotImplemented


def window_attention(q, k, v, kv_heads, *, sinks: int, window: int, q_offset=0,
                     chunk: int = 512):
  kv_heads = tuple(int(x) for x in kv_heads)
  if (WINDOW_IMPL.startswith("cudnn") and _cudnn_ok() and _static_zero(q_offset)
      and cudnn.supported(q, k, v, kv_heads)):
    return cudnn.window_attention(q, k, v, kv_heads, sinks=sinks, window=window,
                                  chunked=WINDOW_IMPL == "cudnn_chunked")
  if _pallas_ok() and flash_k.supported(q, k, v, kv_heads):
    return flash_k.window_attention(q, k, v, kv_heads, sinks=sinks, window=window,
                                    q_offset=q_offset)
  return NotImplemented


def topp_select(qi, ckeys, lengths, *, top_p: float, block_size: int = 64,
                selector: str = "exact"):
  if not (_pallas_ok() and topp_select_k.supported(qi, ckeys, lengths, block_size=block_size)):
    return NotImplemented
  return topp_select_k.topp_select(qi, ckeys, lengths, top_p=top_p, block_size=block_size,
                                   selector=selector)


def sparse_decode(q, k_cache, v_cache, kv_heads, block_mask, lengths, *, block_size: int = 64):
  kv_heads = tuple(int(x) for x in kv_heads)
  if not (_pallas_ok() and decode_k.supported(q, k_cache, v_cache, kv_heads,
                                              block_size=block_size)
          and block_mask.shape == (q.shape[0], q.shape[1], k_cache.shape[2] // block_size)
          and k_cache.shape[2] % block_size == 0):
    return NotImplemented
  return decode_k.sparse_decode(q, k_cache, v_cache, kv_heads, block_mask, lengths,
                                block_size=block_size)


def ring_decode(q, ring_k, ring_v, ring_pos, kv_heads, q_pos, *, sinks: int, window: int,
                sparse_active=None):
  kv_heads = tuple(int(x) for x in kv_heads)
  if not (_pallas_ok() and decode_k.supported(q, ring_k, ring_v, kv_heads, block_size=64)
          and ring_pos.shape == (q.shape[0], ring_k.shape[2])):
    return NotImplemented
  return decode_k.ring_decode(q, ring_k, ring_v, ring_pos, kv_heads, q_pos, sinks=sinks,
                              window=window, sparse_active=sparse_active)


def prefill_select(qi, ki, *, top_p: float, block_size: int = 64):
  if not (_pallas_ok() and prefill_select_k.supported(qi, ki, block_size=block_size)):
    return NotImplemented
  return prefill_select_k.prefill_select(qi, ki, top_p=top_p, block_size=block_size)


def sparse_prefill(q, k, v, kv_heads, block_mask, *, block_size: int = 64, chunk: int = 512):
  kv_heads = tuple(int(x) for x in kv_heads)
  if not (_pallas_ok() and sparse_prefill_k.supported(q, k, v, kv_heads, block_mask,
                                                      block_size=block_size)):
    return NotImplemented
  return sparse_prefill_k.sparse_prefill(q, k, v, kv_heads, block_mask, block_size=block_size)


def cache_prefill_select(qi, ckeys, lengths, *, q_offset=0, top_p: float,
                         block_size: int = 64, chunk: int = 64):
  if not (_pallas_ok() and prefill_select_k.supported(qi, ckeys, block_size=block_size,
                                                      kv_major=True)):
    return NotImplemented
  return prefill_select_k.cache_prefill_select(qi, ckeys, lengths, q_offset=q_offset,
                                               top_p=top_p, block_size=block_size)


def cache_sparse_prefill(q, k_cache, v_cache, kv_heads, block_mask, *, q_offset=0,
                         block_size: int = 64, chunk: int = 512):
  kv_heads = tuple(int(x) for x in kv_heads)
  if not (_pallas_ok() and sparse_prefill_k.supported(q, k_cache, v_cache, kv_heads,
                                                      block_mask, block_size=block_size,
                                                      kv_major=True)):
    return NotImplemented
  return sparse_prefill_k.cache_sparse_prefill(q, k_cache, v_cache, kv_heads, block_mask,
                                               q_offset=q_offset, block_size=block_size)
