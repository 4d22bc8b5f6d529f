"""Which kernels run: a frozen, hashable `KernelConfig`, passed down to `pallas_kernels.ops`.

A model carries its `KernelConfig` as static data (`Transformer(..., kernels=...)`), so the
choice is part of the model's graph definition and of every jit key built from it: another
config gives another compiled program, never a cached one traced with other kernels.

The environment is read in one place, `KernelConfig.from_env`, and only as overrides of the
defaults; `default()` is the process's config, read from the environment once (callers that
pass no config get it):
  RTPURBO_KERNELS      auto | gpu | tpu | reference (default auto: the platform of the default
                       JAX device; gpu / tpu elsewhere run the jnp references)
  RTPURBO_INTERPRET    1: the accelerator kernels run in the Pallas interpreter (CPU tests);
                       races: also the TPU interpreter's race detector
  RTPURBO_CAUSAL_ATTN  GPU implementation of causal_attention        pallas | cudnn | xla | mgpu
  RTPURBO_WINDOW_ATTN  GPU implementation of window_attention        pallas | cudnn |
                                                                     cudnn_chunked | mgpu
  RTPURBO_CACHE_ATTN   GPU implementation of cache_causal_attention  pallas | cudnn | mgpu
An invalid value is a ValueError naming the variable and the choices. The implementation
variables only matter to the gpu backend (`gpu/dispatch.select_impl`; absent: the
implementation measured faster on the GPU's architecture) and are read only for it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping

BACKENDS = ("gpu", "tpu", "reference")

# The implementations of each operation on the gpu backend; "pallas" runs wherever the Pallas
# kernels do, "xla" is the jnp reference compiled by XLA.
IMPLS: dict[str, tuple[str, ...]] = {
    "causal_attention": ("pallas", "cudnn", "xla", "mgpu"),
    "window_attention": ("pallas", "cudnn", "cudnn_chunked", "mgpu"),
    "cache_causal_attention": ("pallas", "cudnn", "mgpu"),
    "topp_select": ("pallas",),
    "sparse_decode": ("pallas",),
    "ring_decode": ("pallas",),
    "prefill_select": ("pallas",),
    "sparse_prefill": ("pallas",),
    "cache_prefill_select": ("pallas",),
    "cache_sparse_prefill": ("pallas",),
}

# The environment variable that overrides the implementation, per operation with a choice.
OVERRIDE_ENV: dict[str, str] = {
    "causal_attention": "RTPURBO_CAUSAL_ATTN",
    "window_attention": "RTPURBO_WINDOW_ATTN",
    "cache_causal_attention": "RTPURBO_CACHE_ATTN",
}


def check_impl(op: str, impl: str, source: str | None = None) -> str:
  """`impl` normalised (stripped, lower case) if it is an implementation of `op`, else a
  ValueError naming `source` (default: the op's environment variable) and the choices."""
  if op not in IMPLS:
    raise ValueError(f"unknown GPU operation {op!r}; expected one of {sorted(IMPLS)}")
  want = str(impl).strip().lower()
  if want not in IMPLS[op]:
    name = source or OVERRIDE_ENV.get(op, f"the {op} override")
    raise ValueError(f"{name}={impl!r} is not an implementation of {op}: expected one of "
                     f"{', '.join(IMPLS[op])}")
  return want


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """The kernels `pallas_kernels.ops` runs.

  backend: "gpu" (Pallas, Triton lowering, + cuDNN), "tpu" (Pallas, Mosaic) or "reference"
    (the jnp oracles of `pallas_kernels.reference`, on any platform).
  interpret: run the accelerator's Pallas kernels in the Pallas interpreter (CPU tests; the
    gpu backend then never picks cuDNN).
  detect_races: with `interpret` on the tpu backend, the TPU interpreter's race detector.
  impls: per-operation implementation overrides for the gpu backend, ((op, impl), ...) sorted
    by op (a mapping is accepted and converted); an op not listed runs the implementation
    `gpu/dispatch.select_impl` measured faster on the GPU's architecture.
  """

  backend: str = "reference"
  interpret: bool = False
  detect_races: bool = False
  impls: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"KernelConfig backend={self.backend!r}: expected one of "
                       f"{', '.join(BACKENDS)}")
    pairs = self.impls.items() if isinstance(self.impls, Mapping) else self.impls
    impls = {}
    for op, impl in pairs:
      impls[op] = check_impl(op, impl, source=f"KernelConfig impls[{op!r}]")
    object.__setattr__(self, "impls", tuple(sorted(impls.items())))
    object.__setattr__(self, "interpret", bool(self.interpret))
    object.__setattr__(self, "detect_races", bool(self.detect_races))

  def impl(self, op: str) -> str | None:
    """The override for `op`, or None (the measured default)."""
    return dict(self.impls).get(op)

  def with_impls(self, **impls: str | None) -> KernelConfig:
    """This config with the given per-operation overrides (None removes one), e.g.
    `cfg.with_impls(window_attention="pallas")`."""
    merged = dict(self.impls)
    for op, impl in impls.items():
      if impl is None:
        merged.pop(op, None)
      else:
        merged[op] = impl
    return dataclasses.replace(self, impls=tuple(merged.items()))

  @classmethod
  def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelConfig:
    """The config that the environment (default `os.environ`) asks for; see the module
    docstring. "auto" resolves to the platform of the default JAX device now."""
    env = os.environ if environ is None else environ
    backend, _ = backend_choice(env)
    flag = env.get("RTPURBO_INTERPRET", "0")
    return cls(backend=backend, interpret=flag not in ("", "0", "false", "False"),
               detect_races=flag.lower() == "races",
               impls=impl_overrides(env) if backend == "gpu" else ())


def backend_choice(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
  """(backend, why in words) from RTPURBO_KERNELS in `environ` (default `os.environ`)."""
  env = os.environ if environ is None else environ
  choice = env.get("RTPURBO_KERNELS", "auto").lower()
  if choice not in ("auto", *BACKENDS):
    raise ValueError(f"RTPURBO_KERNELS={choice!r}: expected auto, gpu, tpu or reference")
  if choice != "auto":
    return choice, f"RTPURBO_KERNELS={choice}"
  import jax
  platform = jax.default_backend()
  name = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform, "reference")
  return name, f"RTPURBO_KERNELS=auto and the default JAX backend is {platform}"


def impl_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """{op: implementation} from the RTPURBO_*_ATTN variables set (non-empty) in `environ`
  (default `os.environ`), validated (ValueError naming the variable and the choices)."""
  env = os.environ if environ is None else environ
  return {op: check_impl(op, env[name], source=name) for op, name in OVERRIDE_ENV.items()
          if env.get(name, "").strip()}


@functools.cache
def default() -> KernelConfig:
  """The process's config: `KernelConfig.from_env()`, read once (on first use)."""
  return KernelConfig.from_env()


def resolve(kernels: KernelConfig | None) -> KernelConfig:
  """`kernels`, or the process default for None."""
  return default() if kernels is None else kernels


__all__ = ["KernelConfig", "BACKENDS", "IMPLS", "OVERRIDE_ENV", "check_impl",
           "backend_choice", "impl_overrides", "default", "resolve"]
