"""Mosaic lowering of every TPU kernel at production shapes (no TPU needed, nothing runs).

`jax.export(..., platforms=["tpu"])` under an abstract TPU device runs the Pallas -> Mosaic
lowering, including the block-shape / tiling checks, so a kernel that would not tile at the
real sizes fails here. The layer is Llama-3.1-8B's (32 query / 8 KV heads, head_dim 128,
bf16) at 128K context with a representative head plan: 5 retrieval heads, 27 local heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from pallas_kernels.tpu import ring_decode as ring_k
from pallas_kernels.tpu import sparse_decode as decode_k
from pallas_kernels.tpu import sparse_prefill as prefill_k
from pallas_kernels.tpu import topp_select as topp_k
from pallas_kernels.tpu import window_attention as window_k

CTX = 128 * 1024
HQ, HKV, D = 32, 8, 128
RETRIEVAL = (0, 5, 9, 13, 22)
LOCAL = tuple(h for h in range(HQ) if h not in RETRIEVAL)
KV_OF = tuple(h // (HQ // HKV) for h in range(HQ))
FULL_KV = tuple(sorted({KV_OF[h] for h in RETRIEVAL}))  # KV heads with a full cache
RING_KV = tuple(k for k in range(HKV) if k not in FULL_KV)  # local-only KV heads
RING_LOCAL = tuple(h for h in LOCAL if KV_OF[h] in RING_KV)
RING_CAPACITY = 16384  # max(sinks + window, seqlen_threshold) at the defaults
NB = CTX // 64

CHIPS = {"v5e": ("TPU v5 lite", 1), "v6e": ("TPU v6 lite", 1), "v5p": ("TPU v5", 2)}


def sds(*shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def lower_for_tpu(fn, *args, chip="v5e") -> str:
  kind, cores = CHIPS[chip]
  device = AbstractDevice(device_kind=kind, num_cores=cores, platform="tpu")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def _kv(heads):
  return tuple(KV_OF[h] for h in heads)


KERNELS = {
    # name: (kernel name in the module, fn, args)
    "window_prefill": ("rtpurbo_window_attention", lambda q, k, v: window_k.window_attention(
        q, k, v, _kv(LOCAL), sinks=4, window=8192),
                       (sds(1, CTX, len(LOCAL), D), sds(1, CTX, HKV, D), sds(1, CTX, HKV, D))),
    "causal_prefill": ("rtpurbo_causal_attention", lambda q, k, v: window_k.causal_attention(
        q, k, v, KV_OF), (sds(1, CTX, HQ, D), sds(1, CTX, HKV, D), sds(1, CTX, HKV, D))),
    "topp_exact": ("rtpurbo_topp_select", lambda qi, ck, n: topp_k.topp_select(
        qi, ck, n, top_p=0.9), (sds(1, 5, 16, dtype=jnp.float32), sds(1, 5, CTX, 16),
                                sds(1, dtype=jnp.int32))),
    "topp_histogram": ("rtpurbo_topp_select", lambda qi, ck, n: topp_k.topp_select(
        qi, ck, n, top_p=0.9, selector="histogram"),
                       (sds(4, 5, 16, dtype=jnp.float32), sds(4, 5, CTX, 16),
                        sds(4, dtype=jnp.int32))),
    "topp_offset": ("rtpurbo_topp_select", lambda qi, ck, n, o: topp_k.topp_select(
        qi, ck, n, top_p=0.9, block_offset=o),
                    (sds(1, 5, 16, dtype=jnp.float32), sds(1, 5, CTX, 16),
                     sds(1, dtype=jnp.int32), sds(1, 5, NB, dtype=jnp.float32))),
    "prefill_select": ("rtpurbo_topp_select", lambda qi, ki: topp_k.prefill_select(
        qi, ki, top_p=0.9), (sds(1, CTX, 5, 16, dtype=jnp.float32), sds(1, CTX, 5, 16))),
    "sparse_decode": ("rtpurbo_sparse_decode", lambda q, k, v, m, n: decode_k.sparse_decode(
        q, k, v, tuple(FULL_KV.index(KV_OF[h]) for h in RETRIEVAL), m, n),
                      (sds(1, 5, D), sds(1, len(FULL_KV), CTX, D), sds(1, len(FULL_KV), CTX, D),
                       sds(1, 5, NB, dtype=jnp.bool_), sds(1, dtype=jnp.int32))),
    "sparse_decode_loop": ("rtpurbo_sparse_decode_loop", lambda q, k, v, m, n:
                           decode_k.sparse_decode(q, k, v, (0, 0, 1, 1, 2), m, n, impl="loop"),
                           (sds(8, 5, D), sds(8, 3, CTX, D), sds(8, 3, CTX, D),
                            sds(8, 5, NB, dtype=jnp.bool_), sds(8, dtype=jnp.int32))),
    # Batch 8: the SMEM block lists are split over several calls.
    "sparse_decode_batch8": ("rtpurbo_sparse_decode", lambda q, k, v, m, n:
                             decode_k.sparse_decode(q, k, v, (0, 0, 1, 1, 2), m, n),
                             (sds(8, 5, D), sds(8, 3, CTX, D), sds(8, 3, CTX, D),
                              sds(8, 5, NB, dtype=jnp.bool_), sds(8, dtype=jnp.int32))),
    "ring_decode": ("rtpurbo_ring_decode", lambda q, k, v, p, t: ring_k.ring_decode(
        q, k, v, p, tuple(RING_KV.index(KV_OF[h]) for h in RING_LOCAL), t, sinks=4,
        window=8192), (sds(1, len(RING_LOCAL), D), sds(1, len(RING_KV), RING_CAPACITY, D),
                       sds(1, len(RING_KV), RING_CAPACITY, D),
                       sds(1, RING_CAPACITY, dtype=jnp.int32), sds(1, dtype=jnp.int32))),
    "sparse_prefill": ("rtpurbo_sparse_prefill", lambda q, k, v, m: prefill_k.sparse_prefill(
        q, k, v, _kv(RETRIEVAL), m), (sds(1, CTX, 5, D), sds(1, CTX, HKV, D),
                                      sds(1, CTX, HKV, D), sds(1, 5, NB, NB, dtype=jnp.bool_))),
}


@pytest.mark.parametrize("chip", list(CHIPS))
@pytest.mark.parametrize("name", list(KERNELS))
def test_lowers_at_production_shapes(name, chip):
  kernel, fn, args = KERNELS[name]
  text = lower_for_tpu(fn, *args, chip=chip)
  assert "tpu_custom_call" in text and f'kernel_name = "{kernel}"' in text


def test_ops_dispatch_lowers_to_mosaic():
  """Through pallas_kernels.ops with the tpu backend (compiled, not interpreted): the Mosaic
  kernel, not the jnp reference, ends up in the program."""
  from pallas_kernels import ops
  from pallas_kernels.config import KernelConfig

  kvh = tuple(FULL_KV.index(KV_OF[h]) for h in RETRIEVAL)
  fn = functools.partial(ops.sparse_decode, kv_heads=kvh, block_size=64,
                         kernels=KernelConfig("tpu"))
  text = lower_for_tpu(lambda q, k, v, m, n: fn(q, k, v, block_mask=m, lengths=n),
                       *KERNELS["sparse_decode"][2])
  assert 'kernel_name = "rtpurbo_sparse_decode"' in text


def test_lowering_catches_bad_tiling():
  """Control: a block whose second-minor dim is not a multiple of 8 must fail to lower, so
  the tests above would catch a kernel that does not tile."""

  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  def bad(x):
    return pl.pallas_call(copy, grid=(4,), in_specs=[pl.BlockSpec((100, 128), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((100, 128), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    lower_for_tpu(bad, sds(400, 128))
