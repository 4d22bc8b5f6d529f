"""GPU entry points for `pallas_kernels.ops` (backend "gpu").

Each operation's function takes the reference's arguments plus `kernels` (the
`KernelConfig`) and returns the kernel call for them (a zero-argument callable), or None where
no GPU implementation takes them (the jnp reference then runs). It decides from shapes,
dtypes, whether q_offset is a static 0 and the config, before any kernel is traced.

Which implementation runs is decided by `select_impl`, a pure function of the operation, the
GPU architecture (compute capability or device kind), the dtype, whether cuDNN is usable and
an optional override; `impl_for` feeds it this process's device and the config's override
(`KernelConfig.impls`; from the environment, `RTPURBO_CAUSAL_ATTN`, `RTPURBO_WINDOW_ATTN`,
`RTPURBO_CACHE_ATTN`: see `pallas_kernels/config.py`). The default is the implementation
measured faster on that architecture (`MEASURED`, from benchmarks/results/*.json, see
benchmarks/NOTES.md); an architecture without measurements keeps the choices made before any
measurement (`UNMEASURED`: cuDNN for whole-sequence causal and window attention, Pallas for
the cache attention of prefill chunks and everything else). The implementations per
operation (`IMPLS`):
  causal_attention        pallas | cudnn | xla | mgpu
  window_attention        pallas | cudnn | cudnn_chunked | mgpu
  cache_causal_attention  pallas | cudnn | mgpu
An invalid override is a ValueError naming its source and the choices. Where the chosen cuDNN
path cannot run (no cuDNN, interpret mode, fp32, a shape cuDNN does not take, or a q_offset
that is not a static 0 for causal / window attention), the Pallas kernel runs; likewise
where the chosen Mosaic GPU kernel cannot (not a Hopper GPU nor the interpreter, fp32, or a
shape it does not take).

Implementations:
  causal_attention   cuDNN flash attention, or the Pallas flash kernel (runtime q_offset);
                     "xla": none (the reference runs as XLA fusions); "mgpu": the Mosaic
                     GPU kernel (wgmma + TMA, warp-specialised; runtime q_offset).
  window_attention   "cudnn" (cuDNN's sliding-window mask), "cudnn_chunked" (two causal cuDNN
                     calls over window-sized chunks + LSE-merged sinks) or "pallas" (one flash
                     kernel with the sink + window rule, runtime q_offset) or "mgpu" (the
                     Mosaic GPU kernel with that rule, runtime q_offset).
  cache_causal_attention  a prefill chunk over the KV cache in place ([b, kv, T, d]): the
                     Pallas flash kernel (kv_major, traced offset), "cudnn", a prefix call
                     (padding mask) + a causal call on the chunk, merged by LSE, or "mgpu"
                     (the Mosaic GPU kernel reading the cache in place, traced offset).
  topp_select        block-LSE kernel + register top-p kernel (exact or histogram).
  sparse_decode      mask -> block lists, split-KV decode kernel.
  ring_decode        visible ring blocks -> block list, same decode kernel (GQA-grouped).
  layer_decode       every head of a mixed layer in one split-KV kernel + one merge (ring,
                     local and dense heads walk their blocks by rule, selected heads a list).
  prefill_select     pooled block-LSE tile kernel + register top-p kernel; the cache_
                     variant reads the compressed-key cache at a runtime chunk offset.
  sparse_prefill     mask -> block lists, block-sparse flash kernel; the cache_ variant
                     reads the KV cache in place at a runtime chunk offset.
The last six (and the cache_ variants) have one implementation, Pallas.
`KernelConfig.interpret` runs every Pallas kernel in the interpreter (CPU); cuDNN is skipped.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from pallas_kernels import config
from pallas_kernels.config import IMPLS, OVERRIDE_ENV, KernelConfig
from pallas_kernels.gpu import cudnn_attention as cudnn
from pallas_kernels.gpu import decode as decode_k
from pallas_kernels.gpu import layer_decode as layer_decode_k
from pallas_kernels.gpu import prefill_select as prefill_select_k
from pallas_kernels.gpu import sparse_prefill as sparse_prefill_k
from pallas_kernels.gpu import topp_select as topp_select_k
from pallas_kernels.gpu import window_attention as flash_k
from pallas_kernels.gpu import window_attention_mgpu as mgpu_k

# ---------------------------------------------------------------------------
# Implementation choice.

# `IMPLS` (the implementations of each operation) and `OVERRIDE_ENV` (the environment variable
# that overrides each switchable one) live in `pallas_kernels.config`, which validates
# overrides; they are re-exported here.

# The faster implementation measured per architecture (H200, jax 0.11.2, Llama-3.1-8B attention
# shapes, bf16; benchmarks/NOTES.md). Operations not listed get "pallas"; architectures not
# listed get UNMEASURED.
MEASURED: dict[str, dict[str, str]] = {
    "hopper": {
        # 5 retrieval heads dense causal, cuDNN vs Pallas: 2.6 vs 3.8 ms at 32K, 39 vs 53 ms
        # at 128K, 710 vs 910 ms at 512K, 2793 vs 3622 ms at 1M (kernels_h200.json, runs 1-2).
        "causal_attention": "cudnn",
        # Paper-mode layer: cuDNN's mask 9.3 / 73.5 / 851 / 3133 ms vs Pallas 10.6 / 77.5 /
        # 853 / 3105 ms at 32K / 128K / 512K / 1M (runs 1-2); vs cudnn_chunked 9.56 / 74.2 /
        # 885 / 3307 against 9.76 / 72.7 / 882 / 3310 ms (run 3): within 2 % from 128K on,
        # fastest at 32K, and it needs no reversed copies.
        "window_attention": "cudnn",
        # One 32K chunk at the middle of a 1M cache, 5 heads on 4 KV heads: 82.9 ms cuDNN vs
        # 104.7 ms Pallas (check_prefill_h200.json); e2e rtpurbo@1M TTFT 114.8 vs 137.4 s.
        "cache_causal_attention": "cudnn",
    },
}

# float32 inputs (cuDNN takes none), where measured: "xla" returns NotImplemented, so the
# jnp reference runs as XLA fusions.
MEASURED_FP32: dict[str, dict[str, str]] = {
    "hopper": {
        # SmolLM2-135M teacher pass at 8K tokens (30 layers, 9 heads, head_dim 64, fp32): the
        # Pallas flash kernel 1751 ms against about 126 ms through XLA
        # (benchmarks/results/stage1_speed_h200.json).
        "causal_attention": "xla",
    },
}

# Architectures without measurements (Ampere, Ada, Blackwell, ...): the choices made before any
# measurement, unchanged until one is made there. Operations not listed get "pallas".
UNMEASURED: dict[str, str] = {"causal_attention": "cudnn", "window_attention": "cudnn"}

# cuDNN's flash attention takes half-precision inputs only.
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def gpu_arch(compute_capability=None, device_kind: str | None = None) -> str | None:
  """The architecture family that `MEASURED` is keyed by: "hopper" for compute capability 9.x
  (or, without one, an H100 / H200 / H800 / H20 / GH200 device kind), else "sm_<major><minor>";
  None when neither input names a GPU.

  compute_capability: "9.0" (as `jax.Device.compute_capability`), (9, 0) or None.
  """
  if compute_capability is not None:
    if isinstance(compute_capability, str):
      parts = compute_capability.strip().split(".")
    else:
      parts = [str(x) for x in tuple(compute_capability)]
    digits = ["".join(c for c in p if c.isdigit()) for p in parts] + ["0"]
    if digits[0]:
      major = int(digits[0])
      return "hopper" if major == 9 else f"sm_{major}{digits[1] or '0'}"
  if device_kind and re.search(r"\bG?H(20|100|200|800)\b", device_kind.upper()):
    return "hopper"
  return None


def select_impl(op: str, *, dtype, cudnn_available: bool, compute_capability=None,
                device_kind: str | None = None, override: str | None = None,
                source: str | None = None, interpret: bool = False) -> str:
  """The implementation of `op` (a key of `IMPLS`) to run: pure, no device or environment read.

  override: an implementation name (case-insensitive; None or "" = none), validated against
    `IMPLS[op]` even where it could not run; an invalid one raises ValueError naming `source`
    (default: the op's environment variable) and the choices.
  Without an override: `MEASURED[gpu_arch(...)]` (`UNMEASURED` for an architecture not
  listed there), "pallas" for an op it does not list.
  float32 inputs take `MEASURED_FP32[arch]` over that table where it has the op.
  A cuDNN choice becomes "pallas" unless cuDNN is available and `dtype` is bf16 / fp16; a
  Mosaic GPU choice ("mgpu") unless `dtype` is bf16 / fp16 and the device is a Hopper GPU or
  the Pallas interpreter runs (`interpret`).
  """
  if op not in IMPLS:
    raise ValueError(f"unknown GPU operation {op!r}; expected one of {sorted(IMPLS)}")
  if override is not None and str(override).strip():
    want = config.check_impl(op, override, source)
  else:
    arch = gpu_arch(compute_capability, device_kind)
    table = MEASURED.get(arch, UNMEASURED)
    if jnp.dtype(dtype) == jnp.float32:
      table = {**table, **MEASURED_FP32.get(arch, {})}
    want = table.get(op, "pallas")
  if want.startswith("cudnn") and not (cudnn_available and jnp.dtype(dtype) in CUDNN_DTYPES):
    return "pallas"
  if want == "mgpu" and not ((interpret or gpu_arch(compute_capability, device_kind) == "hopper")
                             and jnp.dtype(dtype) in CUDNN_DTYPES):
    return "pallas"
  return want


def default_impls(*, dtype, cudnn_available: bool, compute_capability=None,
                  device_kind: str | None = None) -> dict[str, str]:
  """`select_impl` of every operation without overrides: what the dispatch picks by default."""
  return {op: select_impl(op, dtype=dtype, cudnn_available=cudnn_available,
                          compute_capability=compute_capability, device_kind=device_kind)
          for op in IMPLS}


def device_info() -> tuple[str, str | None]:
  """(device kind, compute capability) of this process's default device."""
  dev = jax.devices()[0]
  return str(getattr(dev, "device_kind", "")), getattr(dev, "compute_capability", None)


def impl_for(op: str, dtype, kernels: KernelConfig) -> str:
  """The implementation of `op` at `dtype` under `kernels`: `select_impl` on this process's
  default device, whether cuDNN can run here and the config's override."""
  kind, cc = device_info()
  return select_impl(op, dtype=dtype, cudnn_available=_cudnn_ok(kernels), compute_capability=cc,
                     device_kind=kind, override=kernels.impl(op), interpret=kernels.interpret)


def current_impls(dtype, kernels: KernelConfig | None = None) -> dict[str, str]:
  """`impl_for` of every operation (what a benchmark records as its kernel choices);
  kernels None: the process default."""
  kernels = config.resolve(kernels)
  return {op: impl_for(op, dtype, kernels) for op in IMPLS}


def _pallas_ok(kernels: KernelConfig) -> bool:
  """Pallas Triton kernels can run: on a CUDA device, or in the interpreter."""
  return kernels.interpret or jax.default_backend() in ("gpu", "cuda")


def _cudnn_ok(kernels: KernelConfig) -> bool:
  return not kernels.interpret and jax.default_backend() in ("gpu", "cuda")


def _static_zero(q_offset) -> bool:
  """q_offset is a concrete 0 (a traced scalar is never: its value is unknown here)."""
  return not isinstance(q_offset, jax.core.Tracer) and int(q_offset) == 0


def _heads(kv_heads) -> tuple[int, ...]:
  return tuple(int(x) for x in kv_heads)


# ---------------------------------------------------------------------------
# One function per operation: the reference's arguments plus `kernels`; returns the kernel
# call, or None (the reference runs).


def causal_attention(q, k, v, kv_heads, *, q_offset=0, chunk: int = 512,
                     kernels: KernelConfig):
  kv_heads = _heads(kv_heads)
  impl = impl_for("causal_attention", q.dtype, kernels)
  if impl == "xla":
    return None
  if impl == "cudnn" and _static_zero(q_offset) and cudnn.supported(q, k, v, kv_heads):
    return functools.partial(cudnn.causal_attention, q, k, v, kv_heads)
  if impl == "mgpu" and mgpu_k.supported(q, k, v, kv_heads, q_offset=q_offset):
    return functools.partial(mgpu_k.causal_attention, q, k, v, kv_heads, q_offset=q_offset,
                             interpret=kernels.interpret)
  if _pallas_ok(kernels) and flash_k.supported(q, k, v, kv_heads):
    return functools.partial(flash_k.causal_attention, q, k, v, kv_heads, q_offset=q_offset,
                             interpret=kernels.interpret)
  return None


def cache_causal_attention(q, k_cache, v_cache, kv_heads, *, q_offset=0, chunk: int = 512,
                           kernels: KernelConfig):
  kv_heads = _heads(kv_heads)
  d = q.shape[-1]
  impl = impl_for("cache_causal_attention", q.dtype, kernels)
  if impl == "mgpu" and mgpu_k.supported(q, k_cache, v_cache, kv_heads, q_offset=q_offset,
                                         kv_major=True):
    return functools.partial(mgpu_k.cache_causal_attention, q, k_cache, v_cache, kv_heads,
                             q_offset=q_offset, interpret=kernels.interpret)
  if (impl == "cudnn" and d % 8 == 0
      and d <= 256 and q.dtype == k_cache.dtype == v_cache.dtype
      and k_cache.shape == v_cache.shape and k_cache.shape[-1] == d):
    return functools.partial(cudnn.cache_causal_attention, q, k_cache, v_cache, kv_heads,
                             q_offset=q_offset)
  if _pallas_ok(kernels) and flash_k.supported(q, k_cache, v_cache, kv_heads, kv_major=True):
    return functools.partial(flash_k.causal_attention, q, k_cache, v_cache, kv_heads,
                             q_offset=q_offset, kv_major=True, interpret=kernels.interpret)
  return None


def window_attention(q, k, v, kv_heads, *, sinks: int, window: int, q_offset=0,
                     chunk: int = 512, kernels: KernelConfig):
  kv_heads = _heads(kv_heads)
  impl = impl_for("window_attention", q.dtype, kernels)
  if impl.startswith("cudnn") and _static_zero(q_offset) and cudnn.supported(q, k, v, kv_heads):
    return functools.partial(cudnn.window_attention, q, k, v, kv_heads, sinks=sinks,
                             window=window, chunked=impl == "cudnn_chunked")
  if impl == "mgpu" and mgpu_k.supported(q, k, v, kv_heads, q_offset=q_offset):
    return functools.partial(mgpu_k.window_attention, q, k, v, kv_heads, sinks=sinks,
                             window=window, q_offset=q_offset, interpret=kernels.interpret)
  if _pallas_ok(kernels) and flash_k.supported(q, k, v, kv_heads):
    return functools.partial(flash_k.window_attention, q, k, v, kv_heads, sinks=sinks,
                             window=window, q_offset=q_offset, interpret=kernels.interpret)
  return None


def topp_select(qi, ckeys, lengths, *, top_p: float, block_size: int = 64,
                selector: str = "exact", block_offset=None, kernels: KernelConfig):
  if not (_pallas_ok(kernels)
          and topp_select_k.supported(qi, ckeys, lengths, block_size=block_size)):
    return None
  return functools.partial(topp_select_k.topp_select, qi, ckeys, lengths, top_p=top_p,
                           block_size=block_size, selector=selector,
                           block_offset=block_offset, interpret=kernels.interpret)


def sparse_decode(q, k_cache, v_cache, kv_heads, block_mask, lengths, *, block_size: int = 64,
                  kernels: KernelConfig):
  kv_heads = _heads(kv_heads)
  if not (_pallas_ok(kernels)
          and decode_k.supported(q, k_cache, v_cache, kv_heads, block_size=block_size)
          and block_mask.shape == (q.shape[0], q.shape[1], k_cache.shape[2] // block_size)
          and k_cache.shape[2] % block_size == 0):
    return None
  return functools.partial(decode_k.sparse_decode, q, k_cache, v_cache, kv_heads, block_mask,
                           lengths, block_size=block_size, interpret=kernels.interpret)


def ring_decode(q, ring_k, ring_v, ring_pos, kv_heads, q_pos, *, sinks: int, window: int,
                sparse_active=None, kernels: KernelConfig):
  kv_heads = _heads(kv_heads)
  if not (_pallas_ok(kernels)
          and decode_k.supported(q, ring_k, ring_v, kv_heads, block_size=64)
          and ring_pos.shape == (q.shape[0], ring_k.shape[2])):
    return None
  return functools.partial(decode_k.ring_decode, q, ring_k, ring_v, ring_pos, kv_heads, q_pos,
                           sinks=sinks, window=window, sparse_active=sparse_active,
                           interpret=kernels.interpret)


def layer_decode(q, ring_k, ring_v, ring_pos, full_k, full_v, lengths, q_pos, block_mask, *,
                 heads, sinks: int, window: int, sparse_active=None, block_size: int = 64,
                 kernels: KernelConfig):
  if not (_pallas_ok(kernels)
          and layer_decode_k.supported(q, ring_k, ring_v, ring_pos, full_k, full_v,
                                       heads=heads, block_size=block_size)):
    return None
  return functools.partial(layer_decode_k.layer_decode, q, ring_k, ring_v, ring_pos, full_k,
                           full_v, lengths, q_pos, block_mask, heads=heads, sinks=sinks,
                           window=window, sparse_active=sparse_active, block_size=block_size,
                           interpret=kernels.interpret)


def prefill_select(qi, ki, *, top_p: float, block_size: int = 64, kernels: KernelConfig):
  if not (_pallas_ok(kernels) and prefill_select_k.supported(qi, ki, block_size=block_size)):
    return None
  return functools.partial(prefill_select_k.prefill_select, qi, ki, top_p=top_p,
                           block_size=block_size, interpret=kernels.interpret)


def sparse_prefill(q, k, v, kv_heads, block_mask, *, block_size: int = 64, chunk: int = 512,
                   kernels: KernelConfig):
  kv_heads = _heads(kv_heads)
  if not (_pallas_ok(kernels) and sparse_prefill_k.supported(q, k, v, kv_heads, block_mask,
                                                             block_size=block_size)):
    return None
  return functools.partial(sparse_prefill_k.sparse_prefill, q, k, v, kv_heads, block_mask,
                           block_size=block_size, interpret=kernels.interpret)


def cache_prefill_select(qi, ckeys, lengths, *, q_offset=0, top_p: float,
                         block_size: int = 64, chunk: int = 64, kernels: KernelConfig):
  if not (_pallas_ok(kernels) and prefill_select_k.supported(qi, ckeys, block_size=block_size,
                                                             kv_major=True)):
    return None
  return functools.partial(prefill_select_k.cache_prefill_select, qi, ckeys, lengths,
                           q_offset=q_offset, top_p=top_p, block_size=block_size,
                           interpret=kernels.interpret)


def cache_sparse_prefill(q, k_cache, v_cache, kv_heads, block_mask, *, q_offset=0,
                         block_size: int = 64, chunk: int = 512, kernels: KernelConfig):
  kv_heads = _heads(kv_heads)
  if not (_pallas_ok(kernels) and sparse_prefill_k.supported(q, k_cache, v_cache, kv_heads,
                                                             block_mask, block_size=block_size,
                                                             kv_major=True)):
    return None
  return functools.partial(sparse_prefill_k.cache_sparse_prefill, q, k_cache, v_cache,
                           kv_heads, block_mask, q_offset=q_offset, block_size=block_size,
                           interpret=kernels.interpret)
