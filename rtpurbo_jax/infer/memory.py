"""Memory planning: do weights + KV cache + workspace fit each device, before allocating?

All sizes come from shapes only (no array is allocated): parameters from an abstract model
(`nnx.eval_shape`), the cache from `attention.cache.init_layer_cache` under `jax.eval_shape`
(exactly what `Transformer.init_cache` allocates: whole blocks, ring buffers, compressed keys),
each divided over the mesh by its logical axes (`sharding.LOGICAL_RULES`; an axis that does not
divide a dimension is replicated, as in `sharding.logical_to_spec`).

Workspace is an estimate of the largest transient buffers of one prefill chunk: the chunk's
activations, the reference attention scratch of ring-buffer local heads (O(chunk x capacity)),
one layer's transposed full cache, the last-token logits, plus a reserve of 2% of the device
(at least 256 MiB). Dense / retrieval-head prefill is assumed to run through the kernels
(`ops.causal_attention`, O(chunk x block) scratch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types

import jax
import numpy as np

from rtpurbo_jax import sharding as sharding_lib
from rtpurbo_jax.attention import cache as cache_lib
from rtpurbo_jax.attention import routing as routing_lib
from rtpurbo_jax.attention.plan import HeadPlan
from rtpurbo_jax.config import ModelConfig, SparseConfig

GB = 1e9
GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MemoryPlanError(ValueError):
  """The requested run does not fit the device memory. The message gives the numbers."""


def synthetic_plan(cfg: ModelConfig, ratio: float = 0.15, seed: int = 0) -> HeadPlan:
  """A stand-in plan (random head scores, global top `ratio`) for shape-only runs."""
  scores = np.random.default_rng(seed).random((cfg.num_layers, cfg.num_heads))
  return HeadPlan.from_scores(scores, cfg.num_kv_heads, ratio)


def resolve_mesh_shape(mesh_shape: dict | None, n_devices: int = 1) -> dict:
  """{axis: size} with -1 resolved against `n_devices` (missing axes = 1)."""
  shape = {a: int((mesh_shape or {}).get(a, 1)) for a in sharding_lib.MESH_AXES}
  known = math.prod(v for v in shape.values() if v != -1)
  for a, v in shape.items():
    if v == -1:
      shape[a] = max(1, n_devices // known)
  return shape


def _per_device(shape, axes, mesh_shape: dict) -> int:
  """Elements per device of an array of `shape` with logical `axes` on the mesh."""
  spec = sharding_lib.logical_to_spec(axes, types.SimpleNamespace(shape=mesh_shape), shape)
  n = 1
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    parts = (entry,) if isinstance(entry, str) else (entry or ())
    n *= dim // math.prod(mesh_shape[a] for a in parts)
  return n


def weight_bytes(cfg: ModelConfig, sparse: SparseConfig, plan: HeadPlan, dtype: str,
                 mesh_shape: dict) -> tuple[int, int]:
  """(total, per device) parameter bytes, indexer included."""
  return _weight_bytes(cfg, sparse, plan, dtype, tuple(sorted(mesh_shape.items())))


@functools.lru_cache(maxsize=32)
def _weight_bytes(cfg, sparse, plan, dtype, mesh_items):
  from flax import nnx

  from rtpurbo_jax.models.transformer import Transformer

  mesh_shape = dict(mesh_items)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, sparse=sparse, plan=plan, dtype=dtype,
                                                rngs=nnx.Rngs(0)))
  total = per_dev = 0
  leaves = jax.tree.leaves(nnx.state(abstract), is_leaf=lambda x: isinstance(x, nnx.Variable))
  for var in leaves:
    if not isinstance(var, nnx.Variable):
      continue
    val = var.get_value()
    item = np.dtype(val.dtype).itemsize
    total += math.prod(val.shape) * item
    axes = var.get_metadata().get("out_sharding") or (None,) * len(val.shape)
    per_dev += _per_device(val.shape, axes, mesh_shape) * item
  return int(total), int(per_dev)


def cache_bytes(cfg: ModelConfig, sparse: SparseConfig, plan: HeadPlan, ctx: int, batch: int,
                dtype: str, mesh_shape: dict) -> tuple[int, int]:
  """(total, per device) bytes of `init_cache(batch, ctx)` in `sparse.mode`."""
  fields = cache_field_bytes(cfg, sparse, plan, ctx, batch, dtype, mesh_shape)
  return sum(t for t, _ in fields.values()), sum(p for _, p in fields.values())


def cache_field_bytes(cfg: ModelConfig, sparse: SparseConfig, plan: HeadPlan, ctx: int,
                      batch: int, dtype: str, mesh_shape: dict | None = None
                      ) -> dict[str, tuple[int, int]]:
  """{LayerCache field: (total, per device) bytes} of `init_cache(batch, ctx)` in
  `sparse.mode`, summed over layers: the one count of cache memory."""
  out = {f.name: (0, 0) for f in dataclasses.fields(cache_lib.LayerCache)}
  items = tuple(sorted((mesh_shape or {}).items()))
  for routing in routing_lib.plan_routings(plan, sparse.mode):
    for name, (t, p) in _layer_cache_bytes(routing, cfg, sparse, ctx, batch, dtype, items):
      out[name] = (out[name][0] + t, out[name][1] + p)
  return out


@functools.lru_cache(maxsize=1024)
def _layer_cache_bytes(routing, cfg, sparse, ctx, batch, dtype, mesh_items):
  """((field, total bytes, per-device bytes), ...) of one layer's cache."""
  from rtpurbo_jax.models.transformer import as_dtype

  mesh_shape = resolve_mesh_shape(dict(mesh_items))
  shapes = jax.eval_shape(lambda: cache_lib.init_layer_cache(routing, cfg, sparse, batch, ctx,
                                                             as_dtype(dtype)))
  out = []
  for f in dataclasses.fields(cache_lib.LayerCache):
    x = getattr(shapes, f.name)
    item = np.dtype(x.dtype).itemsize
    out.append((f.name, (int(math.prod(x.shape) * item),
                         int(_per_device(x.shape, cache_lib.CACHE_AXES[f.name], mesh_shape)
                             * item))))
  return tuple(out)


def memory_report(cfg: ModelConfig, plan: HeadPlan | None, ctx: int, batch: int = 1,
                  sparse: SparseConfig | None = None, dtype_bytes: int = 2) -> dict:
  """Cache bytes for `ctx` tokens (what `init_cache` allocates: whole blocks, rings, compressed
  keys, per-row lengths): dense vs the rtpurbo layout of `plan` (None: every head local), with
  the rtpurbo bytes by part and the ratio. dtype_bytes: 2 (bfloat16) or 4 (float32)."""
  dtype = {2: "bfloat16", 4: "float32"}.get(dtype_bytes)
  if dtype is None:
    raise ValueError(f"dtype_bytes={dtype_bytes}: expected 2 (bfloat16) or 4 (float32)")
  sparse = dataclasses.replace(sparse or SparseConfig(), mode="rtpurbo")
  plan = plan if plan is not None else HeadPlan.all_local(cfg)
  total = lambda fields: sum(t for t, _ in fields.values())
  dense = cache_field_bytes(cfg, dataclasses.replace(sparse, mode="dense"), plan, ctx, batch,
                            dtype)
  f = cache_field_bytes(cfg, sparse, plan, ctx, batch, dtype)
  heads = {"full_kv_heads": 0, "ring_kv_heads": 0, "indexed_heads": 0}
  for r in routing_lib.plan_routings(plan, "rtpurbo"):
    heads["full_kv_heads"] += len(r.full_kv)
    heads["ring_kv_heads"] += len(r.ring_kv)
    heads["indexed_heads"] += len(r.selected)
  rtpurbo = total(f)
  return {
      "ctx": ctx, "batch": batch,
      "dense_bytes": total(dense),
      "rtpurbo_bytes": rtpurbo,
      "full_kv_bytes": f["full_k"][0] + f["full_v"][0],
      "ring_bytes": f["ring_k"][0] + f["ring_v"][0] + f["ring_pos"][0],
      "compressed_key_bytes": f["ckeys"][0],
      "length_bytes": f["length"][0],
      **heads,
      "ratio": total(dense) / max(rtpurbo, 1),
  }


def workspace_bytes(cfg: ModelConfig, sparse: SparseConfig, plan: HeadPlan, ctx: int,
                    batch: int, dtype: str, prefill_chunk: int, mesh_shape: dict,
                    device_memory: int) -> int:
  """Estimated transient bytes per device of one prefill chunk (see the module docstring)."""
  act = DTYPE_BYTES[dtype]
  c = max(1, min(prefill_chunk, ctx))
  e, m, h, k, d = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim)
  acts = batch * c * (4 * e + 2 * (h + 2 * k) * d + 3 * m) * act
  logits = 2 * batch * cfg.vocab_size * 4
  t = -(-ctx // sparse.block_size) * sparse.block_size
  ring_heads = full_kv = n_sel = 0
  for routing in routing_lib.plan_routings(plan, sparse.mode):
    ring_heads = max(ring_heads, len(routing.ring_local))
    full_kv = max(full_kv, len(routing.full_kv))
    n_sel = max(n_sel, len(routing.selected))
  # Sparse prefill, per layer: block log-masses (f32), block lists (int32) and two masks over
  # [selected heads, query blocks of the chunk, key blocks of the cache].
  select_scratch = 0
  if sparse.sparse_prefill and n_sel:
    bs = sparse.block_size
    select_scratch = batch * n_sel * -(-c // bs) * (t // bs) * 10
  ring_scratch = 0
  if ring_heads:
    ring_scratch = 2 * batch * ring_heads * min(512, c) * (sparse.ring_capacity + c) * 4
  shard = mesh_shape.get("tensor", 1) * mesh_shape.get("context", 1)
  transposed = 2 * batch * t * full_kv * d * act // shard
  reserve = max(256 << 20, int(0.02 * device_memory))
  return int(acts + logits + ring_scratch + select_scratch + transposed + reserve)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device for one run configuration, and the largest context that would fit."""

  mode: str
  ctx: int
  batch: int
  dtype: str
  mesh: dict
  device_memory: int
  weight_bytes: int
  weight_bytes_per_device: int
  cache_bytes: int
  cache_bytes_per_device: int
  workspace_bytes_per_device: int
  max_ctx: int

  @property
  def total_per_device(self) -> int:
    return (self.weight_bytes_per_device + self.cache_bytes_per_device
            + self.workspace_bytes_per_device)

  @property
  def fits(self) -> bool:
    return self.total_per_device <= self.device_memory

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(total_per_device=self.total_per_device, fits=self.fits)
    return d

  def describe(self) -> str:
    verdict = "fits" if self.fits else "does NOT fit"
    return (f"{self.mode:>9} ctx={format_tokens(self.ctx)} batch={self.batch}: "
            f"weights {fmt(self.weight_bytes_per_device)} + cache "
            f"{fmt(self.cache_bytes_per_device)} + workspace "
            f"{fmt(self.workspace_bytes_per_device)} = {fmt(self.total_per_device)} per device "
            f"of {fmt(self.device_memory)}: {verdict}; max ctx that fits: "
            f"{format_tokens(self.max_ctx) if self.max_ctx else 'none'}")


def plan_memory(cfg: ModelConfig, sparse: SparseConfig, plan: HeadPlan | None, ctx: int, *,
                batch: int = 1, dtype: str = "bfloat16", mesh_shape: dict | None = None,
                device_memory: int | None = None, prefill_chunk: int = 4096,
                n_devices: int | None = None, retrieval_ratio: float = 0.15) -> MemoryPlan:
  """Per-device bytes for `ctx` tokens x `batch` in `sparse.mode` on the mesh.

  plan: the head plan (None: `synthetic_plan(cfg, retrieval_ratio)`); device_memory: bytes per
  device (None: `device_memory_bytes()`).
  """
  if dtype not in DTYPE_BYTES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
  if ctx < 1 or batch < 1:
    raise ValueError(f"ctx={ctx} and batch={batch} must be >= 1")
  plan = plan if plan is not None else synthetic_plan(cfg, retrieval_ratio)
  plan.check(cfg)
  n_devices = n_devices or jax.device_count()
  mesh_shape = resolve_mesh_shape(mesh_shape, n_devices)
  device_memory = int(device_memory if device_memory is not None else device_memory_bytes())
  w_total, w_dev = weight_bytes(cfg, sparse, plan, dtype, mesh_shape)

  def per_device(n):
    c_total, c_dev = cache_bytes(cfg, sparse, plan, n, batch, dtype, mesh_shape)
    ws = workspace_bytes(cfg, sparse, plan, n, batch, dtype, prefill_chunk, mesh_shape,
                         device_memory)
    return c_total, c_dev, ws

  c_total, c_dev, ws = per_device(ctx)
  fits = lambda n: w_dev + sum(per_device(n)[1:]) <= device_memory
  return MemoryPlan(sparse.mode, ctx, batch, dtype, mesh_shape, device_memory, w_total, w_dev,
                    c_total, c_dev, ws, _max_fitting(fits, sparse.block_size))


def _max_fitting(fits, step: int) -> int:
  """Largest multiple of `step` (<= 2**30) for which fits(n) holds; 0 if none."""
  if not fits(step):
    return 0
  lo, hi = 1, 2
  while hi * step <= (1 << 30) and fits(hi * step):
    lo, hi = hi, hi * 2
  if hi * step > (1 << 30):
    return lo * step
  while hi - lo > 1:  # fits(lo * step) and not fits(hi * step)
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
  return lo * step


def check_memory(mem: MemoryPlan) -> MemoryPlan:
  """Raise one clear MemoryPlanError if `mem` does not fit; else return it."""
  if mem.fits:
    return mem
  hint = (f"the largest context that fits is {format_tokens(mem.max_ctx)} tokens"
          if mem.max_ctx else "not even one block of context fits (weights alone: "
          f"{fmt(mem.weight_bytes_per_device)})")
  raise MemoryPlanError(
      f"out of memory before allocating: mode={mem.mode} ctx={mem.ctx} batch={mem.batch} "
      f"({mem.dtype}) needs {fmt(mem.total_per_device)} per device (weights "
      f"{fmt(mem.weight_bytes_per_device)} + KV cache {fmt(mem.cache_bytes_per_device)} + "
      f"workspace {fmt(mem.workspace_bytes_per_device)}) but a device has "
      f"{fmt(mem.device_memory)}; {hint}. Use a shorter --ctx, a sparser --mode (rtpurbo, "
      f"streaming), more devices on the mesh, or set --device_memory if the detected size is "
      f"wrong.")


# ---------------------------------------------------------------------------
# Device memory and formatting.


def device_memory_bytes(device=None) -> int:
  """Memory available to one device: the allocator limit on accelerators, host RAM on CPU."""
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # some backends do not implement memory_stats
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return host_memory_bytes()


def host_memory_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_bytes(text) -> int:
  """'141G' / '141GB' -> 141e9 bytes; '139GiB' -> 139 * 2**30; a plain number is bytes."""
  if isinstance(text, (int, np.integer)):
    return int(text)
  m = _BYTES.match(str(text))
  if not m:
    raise ValueError(f"cannot read a memory size from {text!r}: use e.g. 141G, 80GB or 139GiB")
  value, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
  power = " kmgt".index(unit) if unit else 0
  return int(value * (1024 if binary else 1000) ** power)


def fmt(n: int) -> str:
  """Bytes as GB (decimal) from 1 GB up, else MB / KB."""
  for unit, size in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
    if n >= size or unit == "KB":
      return f"{n / size:.2f} {unit}"


def format_tokens(n: int) -> str:
  if n >= 1 << 20 and n % (1 << 20) == 0:
    return f"{n >> 20}M"
  if n >= 1 << 10 and n % (1 << 10) == 0:
    return f"{n >> 10}K"
  return str(n)
