"""Kernel dispatch: one entry point per operation, routed by a `KernelConfig`.

Every entry point takes the reference's arguments plus `kernels=` (a
`pallas_kernels.config.KernelConfig`; None: the process default, `config.default()`, read
from the environment once). Backends: "gpu" (Pallas, Triton lowering, + cuDNN), "tpu"
(Pallas, Mosaic), "reference" (plain jnp, runs anywhere).

An accelerator module `pallas_kernels.<backend>.dispatch` exports, for each operation it
accelerates, a function with the reference's signature plus `kernels` that returns the kernel
call for those arguments (a zero-argument callable), or None where no kernel of that backend
takes them: a shape, dtype or head layout it does not tile, a q_offset that must be static but
is traced, or an implementation choice that is the reference itself. It decides from shapes,
dtypes, static arguments and the config, before any kernel is traced; the reference then
runs. A kernel that raises is a bug and the error reaches the caller.

`supports(op, *args, kernels=..., **kwargs)` asks that question without running anything.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from pallas_kernels import config
from pallas_kernels import reference

OPERATIONS = ("causal_attention", "cache_causal_attention", "window_attention", "topp_select",
              "sparse_decode", "ring_decode", "prefill_select", "sparse_prefill",
              "cache_prefill_select", "cache_sparse_prefill", "layer_decode")


@functools.cache
def accelerator(backend: str):
  """The accelerator module of `backend` (`pallas_kernels.<backend>.dispatch`), None for the
  reference backend."""
  if backend == "reference":
    return None
  if backend not in config.BACKENDS:
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {config.BACKENDS}")
  return importlib.import_module(f"pallas_kernels.{backend}.dispatch")


def kernel_for(op: str, *args, kernels: config.KernelConfig | None = None,
               **kwargs) -> Callable[[], tuple] | None:
  """The accelerator kernel call that `ops.<op>(*args, **kwargs)` runs under `kernels` (a
  zero-argument callable), or None where the jnp reference runs."""
  cfg = config.resolve(kernels)
  choose = getattr(accelerator(cfg.backend), op, None)
  return None if choose is None else choose(*args, kernels=cfg, **kwargs)


def supports(op: str, *args, kernels: config.KernelConfig | None = None, **kwargs) -> bool:
  """Whether an accelerator kernel (not the reference) runs `ops.<op>(*args, **kwargs)`
  under `kernels`."""
  return kernel_for(op, *args, kernels=kernels, **kwargs) is not None


def _route(op: str):
  ref = getattr(reference, op)

  @functools.wraps(ref)
  def call(*args, kernels: config.KernelConfig | None = None, **kwargs):
    run = kernel_for(op, *args, kernels=kernels, **kwargs)
    return ref(*args, **kwargs) if run is None else run()

  return call


causal_attention = _route("causal_attention")
cache_causal_attention = _route("cache_causal_attention")
window_attention = _route("window_attention")
topp_select = _route("topp_select")
sparse_decode = _route("sparse_decode")
ring_decode = _route("ring_decode")
prefill_select = _route("prefill_select")
sparse_prefill = _route("sparse_prefill")
cache_prefill_select = _route("cache_prefill_select")
cache_sparse_prefill = _route("cache_sparse_prefill")
layer_decode = _route("layer_decode")
# Always the reference: general position-masked attention for ragged / chunked cases.
masked_attention = reference.masked_attention
merge_attention = reference.merge_attention
topk_select = reference.topk_select
