"""Kernel calls whose query offset is a traced scalar (a prefill chunk's start p0)."""

from __future__ import annotations

import jax

from pallas_kernels import ops


def call(op: str, *args, **kwargs):
  """`ops.<op>(..., q_offset=<traced scalar>)`, or the jnp reference when the accelerator
  kernel needs a static offset (it then fails at trace time converting or hashing the tracer).
  """
  from pallas_kernels import reference

  try:
    return getattr(ops, op)(*args, **kwargs)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
          ValueError):
    if ops.backend() == "reference":
      raise
    return getattr(reference, op)(*args, **kwargs)  # takes a traced offset
