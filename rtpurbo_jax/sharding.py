"""Mesh construction and the one logical-axis table.

Mesh axes: `data`, `fsdp`, `tensor`, `context`. Parameters, activations and caches carry
logical names (`batch`, `seq`, `embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `cache_seq`);
`LOGICAL_RULES` maps each to mesh axes. Multi-host: call `jax.distributed.initialize()`
first, then the same code builds a mesh over all processes' devices.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": "context",
    "cache_seq": "context",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def make_mesh(shape: dict | None = None, devices=None) -> Mesh:
  """Mesh over `devices` (default: all) with sizes from `shape` ({axis: size}, -1 = rest)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {})
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {shape}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {shape}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes, mesh: Mesh | None = None, shape=None) -> P:
  """PartitionSpec for logical axis names. A mesh axis used twice, or one that does not divide
  the dimension (when `mesh` and `shape` are given), is dropped (replicated)."""
  used, out = set(), []
  for i, name in enumerate(axes or ()):
    rule = LOGICAL_RULES.get(name) if name else None
    rule = (rule,) if isinstance(rule, str) else (rule or ())
    keep = []
    for ax in rule:
      if ax in used:
        continue
      if mesh is not None and shape is not None:
        size = mesh.shape[ax] * math.prod(mesh.shape[a] for a in keep)
        if shape[i] % size:
          continue
      keep.append(ax)
    used.update(keep)
    out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return P(*out)


def named_sharding(mesh: Mesh, axes, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))


def state_shardings(state, mesh: Mesh):
  """NamedSharding tree for an nnx State whose Variables carry `out_sharding` logical axes."""

  def one(x):
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get("out_sharding")
      return x.replace(named_sharding(mesh, axes, x.get_value().shape))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, mesh: Mesh):
  """Place every parameter of an nnx model by its logical axes (in place)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh)
  nnx.update(model, jax.device_put(state, shardings))
  return model
