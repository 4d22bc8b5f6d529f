"""Kernel dispatch: one entry point per operation, routed by backend.

Backends: "gpu" (Pallas, Triton lowering), "tpu" (Pallas, Mosaic), "reference" (plain jnp,
runs anywhere). The backend is chosen by `RTPURBO_KERNELS` (gpu | tpu | reference | auto,
default auto = the platform of the default JAX device). An accelerator module exports,
for each operation it accelerates, a function with the reference's signature that
returns `NotImplemented` for shapes it does not handle; the reference then runs.

`RTPURBO_INTERPRET=1` runs the accelerator kernels in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import functools
import importlib
import os

import jax

from pallas_kernels import reference

OPERATIONS = ("causal_attention", "cache_causal_attention", "window_attention", "topp_select",
              "sparse_decode", "ring_decode", "prefill_select", "sparse_prefill",
              "cache_prefill_select", "cache_sparse_prefill")


def backend_choice() -> tuple[str, str]:
  """(backend, why): the kernel backend of this process and the reason, in words."""
  choice = os.environ.get("RTPURBO_KERNELS", "auto").lower()
  if choice not in ("auto", "gpu", "tpu", "reference"):
    raise ValueError(f"RTPURBO_KERNELS={choice!r}: expected auto, gpu, tpu or reference")
  if choice != "auto":
    return choice, f"RTPURBO_KERNELS={choice}"
  platform = jax.default_backend()
  name = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform, "reference")
  return name, f"RTPURBO_KERNELS=auto and the default JAX backend is {platform}"


def backend() -> str:
  return backend_choice()[0]


def interpret() -> bool:
  return os.environ.get("RTPURBO_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.cache
def _accelerated(name: str):
  """The accelerator module for backend `name`, or None if it has none."""
  if name == "reference":
    return None
  try:
    return importlib.import_module(f"pallas_kernels.{name}.dispatch")
  except ModuleNotFoundError:
    return None


def _route(op: str):
  ref = getattr(reference, op)

  @functools.wraps(ref)
  def call(*args, **kwargs):
    mod = _accelerated(backend())
    fn = getattr(mod, op, None) if mod is not None else None
    if fn is not None:
      out = fn(*args, **kwargs)
      if out is not NotImplemented:
        return out
    return ref(*args, **kwargs)

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
# Always the reference: general position-masked attention for ragged / chunked cases.
masked_attention = reference.masked_attention
merge_attention = reference.merge_attention
topk_select = reference.topk_select
